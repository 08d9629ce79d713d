# The error records, taken over from `monitoring` (its 0002 drops them from its state).
# The tables already exist: this migration changes Django's model state only.

import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [("monitoring", "0002_move_error_records_to_telemetry")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='ErrorBucket',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('kind', models.CharField(max_length=64)),
                        ('minute', models.DateTimeField(help_text='Start of the minute (UTC).')),
                        ('count', models.PositiveIntegerField(default=0)),
                    ],
                    options={
                        'db_table': 'monitoring_errorbucket',
                        'indexes': [models.Index(fields=['minute'], name='error_bucket_minute_idx')],
                        'constraints': [models.UniqueConstraint(fields=('kind', 'minute'), name='error_bucket_unique')],
                    },
                ),
                migrations.CreateModel(
                    name='ErrorRecord',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('kind', models.CharField(max_length=64)),
                        ('fingerprint', models.CharField(max_length=40)),
                        ('message', models.TextField()),
                        ('context', models.JSONField(blank=True, default=dict, help_text='Context of the latest occurrence.')),
                        ('count', models.PositiveIntegerField(default=1)),
                        ('first_seen', models.DateTimeField(default=django.utils.timezone.now)),
                        ('last_seen', models.DateTimeField(default=django.utils.timezone.now)),
                    ],
                    options={
                        'db_table': 'monitoring_errorrecord',
                        'ordering': ['-last_seen'],
                        'indexes': [models.Index(fields=['last_seen'], name='error_record_last_seen_idx')],
                        'constraints': [models.UniqueConstraint(fields=('kind', 'fingerprint'), name='error_record_unique')],
                    },
                ),
            ],
            database_operations=[],
        )
    ]
