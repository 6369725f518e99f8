"""Load generation. Only ``locustfile.py`` imports locust, and it runs in its own process, so gevent's
monkey-patching never reaches asyncio or BentoML."""
