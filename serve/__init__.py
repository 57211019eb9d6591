"""The Ray Serve HTTP front end: the /api/v1 routes, health, metrics."""
