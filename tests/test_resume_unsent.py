"""A run killed between an answer's row and its event: the resumed run announces the answer once."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from conversations.models import Conversation, Event, Message
from conversations.services import conversation_run, conversation_start
from gateway.principal import Principal

pytestmark = pytest.mark.django_db(transaction=True)

PRINCIPAL = Principal(kind="anonymous", permissions=frozenset({"read", "write"}))


async def test_a_stored_answer_without_its_event_is_announced_once_on_resume(
    thread_connections_closed: None,
) -> None:
    conversation, exchange = await conversation_start(
        principal=PRINCIPAL, message="Is a hot dog a sandwich?", num_agents=3, turns=2
    )
    # What a dead run left: agent_0's turn-1 answer stored, its event never written.
    await Message.objects.acreate(
        conversation=conversation,
        exchange=exchange,
        role=Message.Role.AGENT,
        agent_id="agent_0",
        turn=1,
        content="A hot dog is a sandwich by structure.",
        raw_content="A hot dog is a sandwich by structure.\n\nFINAL POSITION: Yes\nCONFIDENCE: 0.7",
        position="Yes",
        confidence=0.7,
        model="simulated",
        provider="simulated",
        simulated=True,
    )
    done = await conversation_run(conversation_id=conversation.pk, exchange=exchange)
    assert done.status in (Conversation.Status.COMPLETED, Conversation.Status.NO_CONSENSUS)

    events = [e async for e in Event.objects.filter(conversation=conversation).order_by("seq")]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    answers = [
        (e.data["turn"], e.data["agent_id"]) for e in events if e.type in ("agent_response", "agent_error")
    ]
    assert len(answers) == len(set(answers))  # nothing announced twice
    stored = await sync_to_async(
        lambda: sorted(
            Message.objects.filter(conversation=conversation, role=Message.Role.AGENT).values_list(
                "turn", "agent_id"
            )
        )
    )()
    assert sorted(answers) == stored  # every stored answer was sent
    recovered = [e.data for e in events if e.data.get("recovered")]
    assert [(d["type"], d["turn"], d["agent_id"]) for d in recovered] == [("agent_response", 1, "agent_0")]
    assert recovered[0]["content"] == "A hot dog is a sandwich by structure."
