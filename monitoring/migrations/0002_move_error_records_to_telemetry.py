# The error records moved to the `telemetry` app (the bottom layer). Their tables stay as
# they are: only Django's model state changes here; telemetry's 0001 takes them over.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("monitoring", "0001_initial")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name="ErrorBucket"),
                migrations.DeleteModel(name="ErrorRecord"),
            ],
            database_operations=[],
        )
    ]
