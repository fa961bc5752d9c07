from django.db import models


class Product(models.Model):
    name = models.CharField(max_length=200)
    price_cents = models.IntegerField()

    class Meta:
        constraints = [
            models.CheckConstraint(
                check=models.Q(price_cents__gt=0), name="price_positive"
            )
        ]
