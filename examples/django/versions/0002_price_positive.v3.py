# v3: the same migration, fixed: free products cost a cent before the constraint is added. Tenants
# that took v2's version of it have it recorded and skip it; the others run this one.
from django.db import migrations, models


def free_costs_a_cent(apps, schema_editor):
    Product = apps.get_model("catalog", "Product")
    Product.objects.filter(price_cents__lte=0).update(price_cents=1)


class Migration(migrations.Migration):
    dependencies = [("catalog", "0001_initial")]
    operations = [
        migrations.RunPython(free_costs_a_cent, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="product",
            constraint=models.CheckConstraint(
                check=models.Q(price_cents__gt=0), name="price_positive"
            ),
        ),
    ]
