# v2: prices must be positive. A tenant whose data has a price of 0 or less fails here (the
# migration's transaction rolls back; the tenant stays at v1).
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("catalog", "0001_initial")]
    operations = [
        migrations.AddConstraint(
            model_name="product",
            constraint=models.CheckConstraint(
                check=models.Q(price_cents__gt=0), name="price_positive"
            ),
        ),
    ]
