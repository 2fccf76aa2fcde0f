"""Privacy: erasure, export, consent withdrawal and retention of visitor data (service.py) and their routes."""
