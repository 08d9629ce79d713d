"""Named panels: PANELS (validated at start-up), the admin's Panel rows, `default`, which keys
may use which, and /chat and /stream running the panel a body names."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ValidationError

from conversations.models import Conversation, Message
from gateway.keys import principal_for_key
from panels.models import Panel
from panels.registry import PanelNotFound, list_panels, panel_profiles, resolve_panel
from panels.specs import PanelSpec
from polyagents_site.config import ConfigError, load_config

DUO = {
    "description": "two simulated agents",
    "agents": [
        {"provider": "simulated", "model": "sim-a", "temperature": 0.2, "persona": "critical"},
        {"provider": "simulated", "model": "sim-b", "temperature": 0.9, "persona": "Answer as a historian."},
    ],
    "turns": 1,
    "strategy": "weighted",
}


@pytest.fixture
def duo(settings):
    settings.CONFIG = settings.CONFIG.model_copy(
        update={
            "PANELS": {
                "duo": PanelSpec.model_validate(DUO),
                "vip": PanelSpec.model_validate({**DUO, "keys": ["vip-key"]}),
            }
        }
    )


def test_panels_are_validated_at_start_up(monkeypatch):
    monkeypatch.setenv("SECRET_KEY", "x" * 32)
    with pytest.raises(ConfigError, match="PANELS"):
        load_config(PANELS={"bad id!": DUO})
    with pytest.raises(ConfigError, match="PANELS"):
        load_config(PANELS={"p": {**DUO, "agents": []}})
    with pytest.raises(ConfigError, match="PANELS"):
        load_config(PANELS={"p": {**DUO, "agents": [{"model": "m", "temperature": 3}]}})
    with pytest.raises(ConfigError, match="MAX_TURNS"):
        load_config(PANELS={"p": {**DUO, "turns": 9}}, MAX_TURNS=3, DEFAULT_TURNS=2)
    monkeypatch.setenv("PANELS", '{"duo": {"agents": [{"model": "m"}], "surprise": 1}}')
    with pytest.raises(ConfigError, match="PANELS"):
        load_config()
    monkeypatch.delenv("PANELS")
    assert load_config(PANELS={"duo": DUO}).PANELS["duo"].agents[1].persona == "Answer as a historian."


@pytest.mark.django_db
def test_a_key_lists_default_and_the_panels_open_to_it(duo, make_key):
    plain = principal_for_key(make_key(["read"], name="plain")[0])
    vip = principal_for_key(make_key(["read"], name="vip-key")[0])
    admin = principal_for_key(make_key(["admin"], name="root")[0])
    ids = lambda principal: [p.id for p in async_to_sync(list_panels)(principal=principal)]  # noqa: E731
    assert ids(plain) == ["default", "duo"]
    assert ids(vip) == ["default", "duo", "vip"]
    assert ids(admin) == ["default", "duo", "vip"]
    with pytest.raises(PanelNotFound):
        async_to_sync(resolve_panel)(principal=plain, panel_id="vip")
    with pytest.raises(PanelNotFound):
        async_to_sync(resolve_panel)(principal=plain, panel_id="nope")
    panel = async_to_sync(resolve_panel)(principal=vip, panel_id="duo")
    assert [a.model for a in panel.agents] == ["sim-a", "sim-b"]
    assert (panel.turns, panel.strategy) == (1, "weighted")
    assert panel.agents[1].personality == "custom"


@pytest.mark.django_db
def test_the_default_panel_is_the_configured_one(settings, make_key):
    principal = principal_for_key(make_key(["read"])[0])
    panel = async_to_sync(resolve_panel)(principal=principal, panel_id="default")
    assert len(panel.agents) == settings.CONFIG.NUM_AGENTS
    assert panel.turns == settings.CONFIG.DEFAULT_TURNS


@pytest.mark.django_db(transaction=True)  # PostgreSQL: panels are read on a pooled connection
def test_an_admin_panel_with_keys_is_theirs_and_replaces_a_settings_one(duo, make_key):
    owner_row, _ = make_key(["read"], name="owner")
    other = principal_for_key(make_key(["read"], name="other")[0])
    row = Panel.objects.create(
        name="duo", agents=[{"provider": "simulated", "model": "sim-z", "temperature": 0.1}], turns=3
    )
    row.api_keys.add(owner_row)
    panel = async_to_sync(resolve_panel)(principal=principal_for_key(owner_row), panel_id="duo")
    assert ([a.model for a in panel.agents], panel.turns, panel.source) == (["sim-z"], 3, "admin")
    with pytest.raises(PanelNotFound):
        async_to_sync(resolve_panel)(principal=other, panel_id="duo")
    row.enabled = False
    row.save()
    assert async_to_sync(resolve_panel)(principal=other, panel_id="duo").source == "settings"


@pytest.mark.django_db
def test_the_admin_refuses_a_panel_whose_agents_do_not_validate():
    with pytest.raises(ValidationError, match="temperature"):
        Panel(name="x", agents=[{"model": "m", "temperature": 5}]).full_clean()
    with pytest.raises(ValidationError):
        Panel(name="bad id", agents=[{"model": "m"}]).full_clean()
    Panel(name="ok", agents=[{"model": "m"}]).full_clean()


def test_run_agents_override_temperature_and_add_instructions(duo, settings):
    from panels.registry import _from_spec

    config = _from_spec("duo", settings.CONFIG.PANELS["duo"], created=0, source="settings")
    stored = config.run_agents(num_agents=1, temperature=0.0, instructions="Reply in French.")
    (profile,) = panel_profiles(stored) or []
    assert (profile.model, profile.temperature) == ("sim-a", 0.0)
    assert profile.system_instruction.endswith("Reply in French.")
    with pytest.raises(ValueError, match="2 agents"):
        config.run_agents(num_agents=3)


@pytest.mark.django_db(transaction=True)
def test_chat_runs_the_named_panel(duo, client_with):
    response = client_with("read", "write").post(
        "/chat", {"message": "Tea or coffee?", "panel": "duo"}, format="json"
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["metadata"]["num_agents"] == 2
    assert body["metadata"]["turns_requested"] == 1
    assert body["metadata"]["strategy"] == "weighted"
    conversation = Conversation.objects.get(pk=body["conversation_id"])
    assert conversation.metadata["panel"] == "duo"
    models = set(
        Message.objects.filter(conversation=conversation, role="agent").values_list("model", flat=True)
    )
    assert models == {"sim-a", "sim-b"}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"message": "hi", "panel": "vip"}, 404, "panel_not_found"),
        ({"message": "hi", "panel": "nope"}, 404, "panel_not_found"),
        ({"message": "hi", "panel": "../etc"}, 400, "invalid"),
        ({"message": "hi", "panel": "duo", "num_agents": 3}, 422, "panel_too_small"),
    ],
)
def test_chat_and_stream_refuse_a_panel_the_key_may_not_use(duo, client_with, body, status, code):
    client = client_with("read", "write")
    for path in ("/chat", "/stream/6f1c1f0e-4c5b-4a1e-9a7e-1f2d3c4b5a69"):
        response = client.post(path, body, format="json")
        assert response.status_code == status, response.content
        assert response.json()["code"] == code
    assert Conversation.objects.count() == 0


@pytest.mark.django_db(transaction=True)
async def test_stream_stores_the_named_panel(duo, make_key):
    from tests.test_stream import drain_runs, new_key, post_stream

    _, raw = await new_key(make_key)
    conversation_id = "6f1c1f0e-4c5b-4a1e-9a7e-1f2d3c4b5a69"
    response = await post_stream(raw, conversation_id, {"message": "Tea?", "panel": "duo", "turns": 2})
    assert response.status_code == 202, response.content
    await drain_runs()  # no queued run outlives the test
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.turns_requested == 2
    assert [a["model"] for a in conversation.metadata["agents"]] == ["sim-a", "sim-b"]
    models = {m.model async for m in Message.objects.filter(conversation=conversation, role="agent")}
    assert models == {"sim-a", "sim-b"}
