"""Where slides and results live: a local folder or an object store, behind one URL.

The lowest room of ``workers``: it knows nothing of jobs, rows or the engine
(``workers.jobs.objects`` builds a :class:`Store` from the settings).
"""
