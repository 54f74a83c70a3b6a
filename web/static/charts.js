// History charts (uPlot): fleet requests and GPU use on the overview, CPU/memory/GPU on an agent page.
// Minute-scale history: fetched on load and every 30 s, not pushed over the live stream.
(function () {
  "use strict";
  const REFRESH_MS = 30000;
  const css = getComputedStyle(document.documentElement);
  const color = function (name) { return css.getPropertyValue(name).trim() || "#888"; };

  function line(label, stroke, unit, fill) {
    return {
      label: label, stroke: stroke, width: 2, fill: fill ? stroke + "22" : undefined, spanGaps: true,
      // a fresh fleet has single samples, which a line alone cannot show: dots while data is sparse
      points: { size: 5, show: function (u, si) { return u.data[si].filter(function (v) { return v != null; }).length < 8; } },
      value: function (u, v) { return v == null ? "–" : v.toFixed(0) + unit; },
    };
  }

  const kinds = {
    requests: {
      url: function () { return "/dashboard/data/series.json"; },
      data: function (d) { return [d.t, d.ok, d.errors]; },
      series: function () { return [line("Success", color("--ok"), "", true), line("Errors", color("--bad"), "", true)]; },
      yRange: null,
    },
    gpu: {
      url: function () { return "/dashboard/data/series.json"; },
      data: function (d) { return [d.t, d.gpu_util, d.vram_pct]; },
      series: function () { return [line("GPU use", color("--accent"), "%"), line("VRAM", color("--warn"), "%")]; },
      yRange: [0, 100],
    },
    host: {
      url: function (el) { return "/api/agents/" + encodeURIComponent(el.dataset.agent) + "/metrics?since=" + (Date.now() / 1000 - 3600); },
      data: function (d) {
        const s = d.samples || [];
        return [s.map(function (x) { return x.ts; }), s.map(function (x) { return x.cpu; }), s.map(function (x) { return x.mem; })];
      },
      series: function () { return [line("CPU", color("--accent"), "%"), line("Memory", color("--warn"), "%")]; },
      yRange: [0, 100],
    },
    "agent-gpu": {
      url: function (el) { return "/api/agents/" + encodeURIComponent(el.dataset.agent) + "/metrics?since=" + (Date.now() / 1000 - 3600); },
      data: function (d) {
        const s = d.samples || [];
        return [s.map(function (x) { return x.ts; }), s.map(function (x) { return x.gpu_util; }),
                s.map(function (x) { return x.gpu_mem_total ? 100 * x.gpu_mem_used / x.gpu_mem_total : null; })];
      },
      series: function () { return [line("GPU use", color("--accent"), "%"), line("VRAM", color("--warn"), "%")]; },
      yRange: [0, 100],
    },
  };

  function hasPoints(data) {
    for (let i = 1; i < data.length; i++) {
      if (data[i].some(function (v) { return v != null; })) return true;
    }
    return false;
  }

  function setup(el) {
    const kind = kinds[el.dataset.series];
    if (!kind) return;
    let plot = null;
    const empty = document.createElement("p");
    empty.className = "chart-empty";
    el.appendChild(empty);

    function draw(data) {
      const points = data[0].length > 0 && hasPoints(data);
      empty.textContent = points ? "" : (el.dataset.empty || "No data for the last hour yet.");
      empty.hidden = points;
      if (plot) { plot.setData(data); return; }
      if (!points) return;
      plot = new uPlot({
        width: el.clientWidth || 300, height: 180,
        series: [{}].concat(kind.series()),
        scales: {
          // always the last hour, however few samples there are
          x: { time: true, range: function () { const now = Date.now() / 1000; return [now - 3600, now]; } },
          y: { range: kind.yRange || function (u, min, max) { return [0, Math.max(5, Math.ceil(max * 1.1))]; } },
        },
        axes: [{ stroke: color("--muted"), grid: { stroke: color("--line") } },
               { stroke: color("--muted"), grid: { stroke: color("--line") }, size: 44 }],
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
      }, data, el);
      new ResizeObserver(function () { plot.setSize({ width: el.clientWidth, height: 180 }); }).observe(el);
    }

    async function refresh() {
      try {
        const resp = await fetch(kind.url(el), { credentials: "same-origin" });
        if (!resp.ok) throw new Error(resp.status + " " + resp.statusText);
        draw(kind.data(await resp.json()));
      } catch (err) {
        empty.hidden = false;
        empty.textContent = "Chart unavailable: " + err.message;
      }
    }
    refresh();
    setInterval(refresh, REFRESH_MS);
  }

  document.querySelectorAll(".chart[data-series]").forEach(setup);
})();
