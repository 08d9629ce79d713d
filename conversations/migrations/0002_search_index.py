"""Full-text search index on message content (PostgreSQL only; a no-op on SQLite).

The expression matches what `SearchVector("content", config="english")` compiles to,
so the planner can use the index for conversations/search.py.
"""

from django.db import migrations

INDEX = "conv_message_fts_idx"


def create_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        f"CREATE INDEX IF NOT EXISTS {INDEX} ON conversations_message "
        "USING GIN (to_tsvector('english'::regconfig, COALESCE(content, '')))"
    )


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("conversations", "0001_initial")]

    operations = [migrations.RunPython(create_index, drop_index, elidable=False)]
