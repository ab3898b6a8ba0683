"""ipyparallel.controller: only the dependency API has a shoal counterpart;
the Hub, its schedulers and its databases are left out."""
