# Feedback on an exchange's answer (right or wrong), used to recalibrate confidence.

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):


    dependencies = [
        ('conversations', '0004_cost'),
    ]

    operations = [
        migrations.CreateModel(
            name='Feedback',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('exchange', models.PositiveIntegerField(default=1)),
                ('correct', models.BooleanField()),
                ('note', models.TextField(blank=True)),
                ('author', models.CharField(blank=True, help_text='"key:<id>", "user:<id>" or "anonymous".', max_length=64)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('updated_at', models.DateTimeField(auto_now=True)),
                ('conversation', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='feedback', to='conversations.conversation')),
            ],
            options={
                'ordering': ['-created_at'],
                'constraints': [models.UniqueConstraint(fields=('conversation', 'exchange'), name='feedback_one_per_exchange')],
            },
        ),
    ]
