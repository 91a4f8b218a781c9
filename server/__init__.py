"""The lmkube model server: one FastAPI app, four API families over one engine and one model store."""
