"""`python -m services.cli ...`, as the services, tests and deploy files start it."""

from services.cli import app

app()
