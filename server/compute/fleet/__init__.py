"""The compute fleet: stateless API servers and Celery workers over shared task records."""
