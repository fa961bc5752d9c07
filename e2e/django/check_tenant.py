"""Django against one tenant through the Silo router: `migrate`, then queries that psycopg 3
prepares on the server. Connection settings come from the libpq variables PGHOST, PGPORT,
PGDATABASE, PGUSER and PGPASSWORD. Prints one JSON line with what it saw."""

import json
import os

import django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes"],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": os.environ["PGHOST"],
            "PORT": os.environ["PGPORT"],
            "NAME": os.environ["PGDATABASE"],
            "USER": os.environ["PGUSER"],
            "PASSWORD": os.environ["PGPASSWORD"],
            # Prepare every statement on the server, the hard case for a transaction pooler.
            "OPTIONS": {"prepare_threshold": 1},
        }
    },
    USE_TZ=True,
)
django.setup()

from django.contrib.auth.models import User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402

call_command("migrate", verbosity=0, interactive=False)
name = os.environ["PGUSER"][:100]
with transaction.atomic():
    User.objects.get_or_create(username=name)
counts = [User.objects.filter(username=name).count() for _ in range(20)]
with connection.cursor() as cursor:
    cursor.execute("SELECT current_database(), count(*) FROM django_migrations")
    database, migrations = cursor.fetchone()
print(json.dumps({"database": database, "migrations": migrations, "counts": counts}))
