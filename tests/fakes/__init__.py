"""Local stand-ins for the clouds: moto server (AWS), an HTTPS fake of ARM compute (Azure) and a
fake of the Compute Engine REST API (GCP), plus the pytest plugin that starts them."""
