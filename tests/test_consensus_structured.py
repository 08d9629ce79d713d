"""consensus.structured: JSON replies and ballots, the clean answer, the last-resort position."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus import (
    ANSWER_SCHEMA,
    ballot_schema,
    clean_answer,
    last_sentence_position,
    parse_json_object,
    parse_reply,
    parse_structured_ballot,
    parse_structured_reply,
)


class TestStructuredReply:
    def test_reads_position_and_confidence(self) -> None:
        proposal = parse_structured_reply(
            "a", {"answer": "Six sevens.", "position": " 42 ", "confidence": 0.9}
        )
        assert proposal is not None
        assert (proposal.text, proposal.position, proposal.confidence) == ("Six sevens.", "42", 0.9)

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (80, 0.8),
            (1.5, 0.015),
            (-0.2, 0.0),
            ("80%", 0.8),
            ("high", 0.8),
            (math.nan, None),
            (True, None),
            (None, None),
        ],
    )
    def test_confidence_is_read_like_the_text_format_and_clamped(
        self, raw: object, expected: float | None
    ) -> None:
        proposal = parse_structured_reply("a", {"answer": "x", "position": "Yes", "confidence": raw})
        assert proposal is not None
        assert proposal.confidence == expected

    @pytest.mark.parametrize("position", ["", "   ", "n/a", "I don't know", "...", None, 42])
    def test_an_unusable_position_is_an_abstention(self, position: object) -> None:
        assert (
            parse_structured_reply("a", {"answer": "Hmm.", "position": position, "confidence": 0.5}) is None
        )

    def test_a_position_left_in_the_answer_text_is_still_read(self) -> None:
        data = {
            "answer": "Reasons.\nFINAL POSITION: Solar\nCONFIDENCE: 0.6",
            "position": "",
            "confidence": 0.9,
        }
        proposal = parse_structured_reply("a", data)
        assert proposal is not None
        assert (proposal.position, proposal.confidence) == ("Solar", 0.6)

    def test_parse_json_object_tolerates_fences_and_refuses_the_rest(self) -> None:
        assert parse_json_object('```json\n{"a": 1}\n```') == {"a": 1}
        assert parse_json_object(' {"a": 1} ') == {"a": 1}
        assert parse_json_object("[1, 2]") is None
        assert parse_json_object('{"a": ') is None
        assert parse_json_object("FINAL POSITION: Yes") is None


class TestStructuredBallot:
    def test_a_label_of_the_ballot_counts(self) -> None:
        ballot = parse_structured_ballot("v", {"reason": "Best.", "vote": "b", "confidence": 0.7}, ["A", "B"])
        assert (ballot.choice, ballot.confidence, ballot.reason) == ("B", 0.7, "Best.")

    @pytest.mark.parametrize(
        ("vote", "why"), [("C", "unknown label C"), ("A and B", "several labels"), (None, "no vote line")]
    )
    def test_an_unusable_vote_is_an_abstention_saying_why(self, vote: object, why: str) -> None:
        ballot = parse_structured_ballot("v", {"reason": "r", "vote": vote}, ["A", "B"])
        assert ballot.choice is None
        assert ballot.reason == f"[{why}] r"
        assert ballot.confidence == 0.5  # no confidence given

    def test_schemas_put_prose_first_and_restrict_votes(self) -> None:
        assert list(ANSWER_SCHEMA["properties"]) == ["answer", "position", "confidence"]
        schema = ballot_schema(["A", "B", "C"])
        assert schema["properties"]["vote"]["enum"] == ["A", "B", "C"]
        assert schema["required"] == ["reason", "vote", "confidence"]


class TestCleanAnswer:
    @pytest.mark.parametrize(
        ("text", "clean"),
        [
            ("Because.\n\nFINAL POSITION: Yes\nCONFIDENCE: 0.8", "Because."),
            ("Because.\n**FINAL POSITION:** Yes\n**Confidence:** high\n", "Because."),
            ("Because.\nFINAL POSITION:\nYes\nCONFIDENCE:\n0.8", "Because."),
            ("Because.\nCONFIDENCE: 0.8\nFINAL POSITION: Yes", "Because."),
            ("No machine lines here.", "No machine lines here."),
            # Only the trailing block goes: a quoted label inside the prose stays.
            (
                "Agent B wrote FINAL POSITION: No.\nI disagree.\nFINAL POSITION: Yes",
                "Agent B wrote FINAL POSITION: No.\nI disagree.",
            ),
            (
                "Answer: the prose itself has a label line\nand goes on.",
                "Answer: the prose itself has a label line\nand goes on.",
            ),
        ],
    )
    def test_machine_lines_are_removed(self, text: str, clean: str) -> None:
        assert clean_answer(text) == clean

    @given(
        st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200),
        st.sampled_from(["Yes", "42", "Solar power"]),
    )
    def test_cleaning_keeps_the_prose_and_is_idempotent(self, prose: str, position: str) -> None:
        reply = f"{prose}\n\nFINAL POSITION: {position}\nCONFIDENCE: 0.7"
        cleaned = clean_answer(reply)
        assert clean_answer(cleaned) == cleaned
        assert "CONFIDENCE: 0.7" not in cleaned
        assert reply.startswith(cleaned)
        proposal = parse_reply("a", reply)
        assert proposal is not None  # the raw reply still parses; the clean one is for reading


class TestLastSentence:
    @pytest.mark.parametrize(
        ("text", "position"),
        [
            ("I checked it twice, so my answer is 42.", "42"),
            ("Several reasons. The final answer would be: solar power!", "solar power"),
            ("It is cheap. Tenacity", "Tenacity"),
            ("Hmm. I don't know.", None),
            ("", None),
            ("Long. " * 200 + "So my answer is 42.", None),  # too long to trust its last sentence
        ],
    )
    def test_the_final_sentence_or_the_answer_it_names(self, text: str, position: str | None) -> None:
        assert last_sentence_position(text) == position


def test_a_blank_line_between_the_machine_lines_leaves_none_in_the_answer() -> None:
    assert clean_answer("Prose.\n\nFINAL POSITION: 42\n\nCONFIDENCE: 0.8") == "Prose."
    assert clean_answer("Prose.\n\nFINAL POSITION: 42\n\n\nCONFIDENCE: 0.8\n\n") == "Prose."
