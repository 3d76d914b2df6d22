"""The API's routers; thin: parse, call the jobs layer or the store, shape the answer."""
