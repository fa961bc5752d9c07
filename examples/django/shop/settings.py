"""A tenant's shop: one database per tenant, reached with the libpq variables a Silo migration Job
(or the tenant Secret) provides: PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD; PGOPTIONS (the
rollout's lock_timeout) reaches the server through libpq on its own."""
import os

SECRET_KEY = "example-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["catalog"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("PGHOST", ""),
        "PORT": os.environ.get("PGPORT", ""),
        "NAME": os.environ.get("PGDATABASE", ""),
        "USER": os.environ.get("PGUSER", ""),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
