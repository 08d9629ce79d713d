"""`manage.py chat "question"`: run one panel discussion from a terminal."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from agents.providers.registry import aclose_providers
from conversations.selectors import achat_result
from conversations.services import conversation_run, conversation_start
from gateway.principal import Principal


class Command(BaseCommand):
    help = "Ask the agent panel a question and print the consensus."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("question")
        parser.add_argument("--agents", type=int, default=None, help="number of agents (default NUM_AGENTS)")
        parser.add_argument(
            "--turns", type=int, default=None, help="discussion turns (default DEFAULT_TURNS)"
        )
        parser.add_argument("--strategy", choices=["majority", "weighted"], default="majority")
        parser.add_argument(
            "--synthesis", choices=["representative", "chairman"], default=None, help="default SYNTHESIS_MODE"
        )
        parser.add_argument("--json", action="store_true", help="print the full /chat JSON body")

    def handle(self, *args: Any, **options: Any) -> None:
        question = options["question"].strip()
        if not question:
            raise CommandError("the question is empty")
        body = asyncio.run(self._run(question, options))
        if options["json"]:
            self.stdout.write(json.dumps(body, indent=2))
            return
        for agent in body["transcript"]:
            label = f"[turn {agent['turn']}] {agent['agent_id']} ({agent['model']}, t={agent['temperature']})"
            self.stdout.write(self.style.MIGRATE_HEADING(label))
            self.stdout.write(agent["response"].strip() + "\n")
        for failed in body["failed_agents"]:
            self.stdout.write(
                self.style.ERROR(f"{failed['agent_id']} failed in turn {failed['turn']}: {failed['error']}")
            )
        meta = body["metadata"]
        self.stdout.write(self.style.MIGRATE_HEADING("Votes"))
        for vote in body["votes"]:
            self.stdout.write(f"  {vote['voter']} -> {vote['choice'] or 'abstain'} ({vote['confidence']})")
        status = meta["status"]
        if body["consensus_result"]:
            self.stdout.write(
                self.style.SUCCESS(f"Consensus ({status}, confidence {body['confidence']:.2f}):")
            )
            self.stdout.write(body["consensus_result"])
        else:
            self.stdout.write(self.style.WARNING(f"No consensus ({status}). {meta.get('error') or ''}"))
        self.stdout.write(
            f"conversation {body['conversation_id']} in {meta['duration']} s, tokens {body['usage']}"
        )

    async def _run(self, question: str, options: dict[str, Any]) -> dict[str, Any]:
        principal = Principal(
            kind="user", permissions=frozenset({"read", "write", "admin"}), name="cli", user_id=0
        )
        conversation, exchange = await conversation_start(
            principal=principal,
            message=question,
            num_agents=options["agents"],
            turns=options["turns"],
            strategy=options["strategy"],
            synthesis=options["synthesis"],
            running=True,
        )
        try:
            conversation = await conversation_run(
                conversation_id=conversation.pk, exchange=exchange, fresh=conversation, question=question
            )
        finally:
            await aclose_providers()  # before asyncio.run closes the loop their sessions belong to
        return await achat_result(conversation, exchange)
