"""Several controllers on one broker and database: the shared load picture and the leader."""
