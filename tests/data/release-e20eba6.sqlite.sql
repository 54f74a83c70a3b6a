-- The tables release e20eba6 created (its controller/db.py init_db: create_tables(safe=True) of the
-- registered models), dumped from that release's code. tests/test_migrations.py upgrades this schema.
CREATE TABLE "agent" ("node_id" VARCHAR(63) NOT NULL PRIMARY KEY, "display_name" VARCHAR(255) NOT NULL, "tags" TEXT NOT NULL, "notes" TEXT NOT NULL, "state" VARCHAR(16) NOT NULL, "session" VARCHAR(64) NOT NULL, "forced_offline" INTEGER NOT NULL, "ollama_up" INTEGER NOT NULL, "ollama_url" VARCHAR(255) NOT NULL, "ollama_version" VARCHAR(255), "hostname" VARCHAR(255) NOT NULL, "agent_version" VARCHAR(255), "hb_interval" REAL NOT NULL, "info" TEXT NOT NULL, "metrics" TEXT NOT NULL, "loaded" TEXT NOT NULL, "first_seen" REAL NOT NULL, "last_seen" REAL NOT NULL, "online_since" REAL);
CREATE TABLE "apikey" ("id" INTEGER NOT NULL PRIMARY KEY, "name" VARCHAR(64) NOT NULL, "prefix" VARCHAR(16) NOT NULL, "hash" VARCHAR(64) NOT NULL, "created" REAL NOT NULL, "revoked" REAL);
CREATE UNIQUE INDEX "apikey_hash" ON "apikey" ("hash");
CREATE TABLE "event" ("id" INTEGER NOT NULL PRIMARY KEY, "ts" REAL NOT NULL, "node_id" VARCHAR(63), "kind" VARCHAR(32) NOT NULL, "level" VARCHAR(8) NOT NULL, "message" TEXT NOT NULL, "data" TEXT);
CREATE INDEX "event_ts" ON "event" ("ts");
CREATE INDEX "event_node_id" ON "event" ("node_id");
CREATE TABLE "gpu" ("id" INTEGER NOT NULL PRIMARY KEY, "node_id" VARCHAR(63) NOT NULL, "index" INTEGER NOT NULL, "uuid" VARCHAR(255), "name" VARCHAR(255) NOT NULL, "mem_total" INTEGER, "driver" VARCHAR(255));
CREATE UNIQUE INDEX "gpu_node_id_index" ON "gpu" ("node_id", "index");
CREATE TABLE "installedmodel" ("id" INTEGER NOT NULL PRIMARY KEY, "node_id" VARCHAR(63) NOT NULL, "name" VARCHAR(255) NOT NULL, "digest" VARCHAR(255) NOT NULL, "size" INTEGER NOT NULL, "modified_at" VARCHAR(255), "details" TEXT NOT NULL, "installed_at" REAL NOT NULL);
CREATE UNIQUE INDEX "installedmodel_node_id_name" ON "installedmodel" ("node_id", "name");
CREATE TABLE "job" ("id" INTEGER NOT NULL PRIMARY KEY, "task_id" VARCHAR(200) NOT NULL, "job_id" VARCHAR(128) NOT NULL, "node_id" VARCHAR(63) NOT NULL, "verb" VARCHAR(32) NOT NULL, "model" VARCHAR(255), "args" TEXT NOT NULL, "origin" VARCHAR(32) NOT NULL, "status" VARCHAR(16) NOT NULL, "progress" REAL, "completed" INTEGER, "total" INTEGER, "speed" REAL, "eta" REAL, "phase" VARCHAR(255), "error_code" VARCHAR(32), "error" TEXT, "seq" INTEGER NOT NULL, "session" VARCHAR(64), "group_id" VARCHAR(64), "queue_if_offline" INTEGER NOT NULL, "attempts" INTEGER NOT NULL, "created_at" REAL NOT NULL, "dispatched_at" REAL, "started_at" REAL, "finished_at" REAL, "updated_at" REAL NOT NULL);
CREATE UNIQUE INDEX "job_task_id" ON "job" ("task_id");
CREATE INDEX "job_node_id" ON "job" ("node_id");
CREATE INDEX "job_model" ON "job" ("model");
CREATE INDEX "job_origin" ON "job" ("origin");
CREATE INDEX "job_status" ON "job" ("status");
CREATE INDEX "job_group_id" ON "job" ("group_id");
CREATE INDEX "job_created_at" ON "job" ("created_at");
CREATE UNIQUE INDEX "job_node_id_job_id" ON "job" ("node_id", "job_id");
CREATE TABLE "metricsample" ("id" INTEGER NOT NULL PRIMARY KEY, "node_id" VARCHAR(63) NOT NULL, "ts" REAL NOT NULL, "cpu" REAL, "mem" REAL, "gpu_util" REAL, "gpu_mem_used" INTEGER, "gpu_mem_total" INTEGER);
CREATE INDEX "metricsample_node_id_ts" ON "metricsample" ("node_id", "ts");
CREATE TABLE "requestrecord" ("id" INTEGER NOT NULL PRIMARY KEY, "rid" VARCHAR(32) NOT NULL, "ts" REAL NOT NULL, "client" VARCHAR(64) NOT NULL, "key" VARCHAR(64), "endpoint" VARCHAR(64) NOT NULL, "model" VARCHAR(255), "stream" INTEGER NOT NULL, "agent" VARCHAR(63), "status" INTEGER NOT NULL, "attempts" INTEGER NOT NULL, "ttfb_ms" REAL, "duration_ms" REAL NOT NULL, "prompt_tokens" INTEGER, "completion_tokens" INTEGER, "error" TEXT, "failover" TEXT);
CREATE UNIQUE INDEX "requestrecord_rid" ON "requestrecord" ("rid");
CREATE INDEX "requestrecord_ts" ON "requestrecord" ("ts");
CREATE INDEX "requestrecord_model" ON "requestrecord" ("model");
CREATE INDEX "requestrecord_agent" ON "requestrecord" ("agent");
CREATE INDEX "requestrecord_status" ON "requestrecord" ("status");
