"""Example tests for the consensus library: every parsing, normalisation, tie-break and quorum rule."""

from __future__ import annotations

import inspect
import json

import pytest

from consensus import (
    BALLOT_INSTRUCTIONS,
    REPLY_INSTRUCTIONS,
    STRATEGIES,
    Ballot,
    Option,
    Proposal,
    build_options,
    confidence_score,
    interim_agreement,
    is_unanimous,
    majority_vote,
    normalize_answer,
    parse_ballot,
    parse_confidence,
    parse_reply,
    reliability_vote,
    weighted_vote,
)
from consensus.scoring import EPSILON, top
from consensus.voting import Strategy


def options(*keys: str) -> list[Option]:
    """Options labelled A, B... over the given normalised keys (in that order)."""
    return [
        Option(label=chr(ord("A") + i), position=key.capitalize(), key=key, supporters=())
        for i, key in enumerate(keys)
    ]


# --- normalize_answer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("Yes", "yes"),
        ("Yes.", "**YES**"),
        ("yeah", "yes"),
        ("True", "correct"),
        ("Yes, with some caveats", "yes"),
        ("No", "nope!"),
        ("false", "Incorrect."),
        ("Option B", "(b)"),
        ("B)", "option b"),
        ("b.", "Proposal B"),
        ("Choice B: solar", "B"),
        ("42", "42.0"),
        ("forty-two", "42"),
        ("one hundred and five", "105"),
        ("1,000", "1000"),
        ("1,000,000 km", "1000000 km"),
        ("0.50", ".5"),
        ("50%", "50 %"),
        ("Solar power", "solar-power!"),
        ('"Solar  power"', "`solar power`"),
        ("The Eiffel Tower", "Eiffel tower"),
        ("an apple", "Apple"),
        ("-0", "0"),
        ("42 (final)", "42"),
        ("Final: 42", "**42**"),
        ("Paris (France).", "paris"),
        ("[42]", "42"),
    ],
)
def test_equal_answers_share_a_key(left: str, right: str) -> None:
    assert normalize_answer(left) == normalize_answer(right)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("50%", "50"),
        ("Yes", "No"),
        ("No doubt it is Paris", "No"),
        ("C++", "C"),
        ("C#", "C++"),
        ("Option A", "Option B"),
        ("-5", "5"),
        ("Plan A", "Plan B"),
        ("options galore", "option g"),
        ("1,0000", "10000"),
        ("f(x)", "f"),
        ("(42) apples", "42"),
    ],
)
def test_different_answers_keep_different_keys(left: str, right: str) -> None:
    assert normalize_answer(left) != normalize_answer(right)


@pytest.mark.parametrize(
    ("answer", "key"),
    [("Option B", "option b"), ("Yes!", "yes"), ("42.50", "42.5"), ("The Louvre", "louvre"), ("...", "")],
)
def test_normalised_keys_read_as_documented(answer: str, key: str) -> None:
    assert normalize_answer(answer) == key


# --- parse_reply --------------------------------------------------------------------------------


def test_reply_in_the_contract_format_is_parsed() -> None:
    proposal = parse_reply("a1", "Long reasoning here.\nFINAL POSITION: Solar power\nCONFIDENCE: 0.8")
    assert proposal == Proposal(
        agent_id="a1",
        text="Long reasoning here.\nFINAL POSITION: Solar power\nCONFIDENCE: 0.8",
        position="Solar power",
        confidence=0.8,
    )


@pytest.mark.parametrize(
    "text",
    [
        "final position: Yes\nconfidence: 0.7",
        "**FINAL POSITION:** Yes\n**CONFIDENCE:** 0.7",
        "**Final Position**: **Yes**\n*Confidence*: 0.7",
        "- Final answer: Yes\n- Confidence: 0.7",
        "## Position: Yes\nCertainty: 0.7",
        "> Answer - Yes\n> CONFIDENCE = 0.7",
        "FINAL POSITION:\n\n   Yes\nCONFIDENCE:\n0.7",
        'FINAL POSITION: "Yes"\nCONFIDENCE 0.7',
    ],
)
def test_reply_labels_tolerate_case_markdown_and_synonyms(text: str) -> None:
    proposal = parse_reply("a1", text)
    assert proposal is not None
    assert proposal.position == "Yes"
    assert proposal.confidence == pytest.approx(0.7)


def test_the_last_position_and_confidence_win() -> None:
    text = "Agent 2 said:\nFINAL POSITION: No\nCONFIDENCE: 0.9\nI disagree.\n"
    text += "FINAL POSITION: Yes\nCONFIDENCE: 0.6"
    proposal = parse_reply("a1", text)
    assert proposal is not None
    assert (proposal.position, proposal.confidence) == ("Yes", 0.6)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.8", 0.8),
        (".8", 0.8),
        ("80%", 0.8),
        ("80 %", 0.8),
        ("8/10", 0.8),
        ("8 out of 10", 0.8),
        ("80", 0.8),
        ("1", 1.0),
        ("0", 0.0),
        ("1.7", 0.017),
        ("250%", 1.0),
        ("-0.3", 0.0),
        ("**0.9**", 0.9),
        ("high", 0.8),
        ("Very high.", 0.9),
        ("medium", 0.5),
        ("low", 0.2),
        ("3/0", None),
        ("unsure", None),
        ("", None),
    ],
)
def test_confidence_forms_are_read_and_clamped(value: str, expected: float | None) -> None:
    parsed = parse_confidence(value)
    if expected is None:
        assert parsed is None
    else:
        assert parsed == pytest.approx(expected)


def test_reply_without_confidence_has_none() -> None:
    proposal = parse_reply("a1", "FINAL POSITION: 42")
    assert proposal is not None
    assert proposal.confidence is None


def test_inline_confidence_is_read_and_cut_from_the_position() -> None:
    proposal = parse_reply("a1", "FINAL POSITION: Yes (confidence: 0.9)")
    assert proposal is not None
    assert (proposal.position, proposal.confidence) == ("Yes", 0.9)


def test_a_confidence_line_beats_an_inline_confidence() -> None:
    proposal = parse_reply("a1", "FINAL POSITION: Yes (confidence: 0.9)\nCONFIDENCE: 0.4")
    assert proposal is not None
    assert proposal.confidence == 0.4


@pytest.mark.parametrize(
    "text",
    [
        "I think the answer is yes.",
        "Yes\nCONFIDENCE: 0.9",
        "FINAL POSITION:\nCONFIDENCE: 0.9",
        "FINAL POSITION: ...",
        "FINAL POSITION: N/A",
        "FINAL POSITION: I don't know.",
        "FINAL POSITION: abstain",
        "",
        "Error: 503 Service Unavailable",
    ],
)
def test_unusable_replies_are_abstentions(text: str) -> None:
    assert parse_reply("a1", text) is None


def test_position_is_cut_to_one_short_line() -> None:
    proposal = parse_reply("a1", "FINAL POSITION: " + "x" * 500)
    assert proposal is not None
    assert len(proposal.position) == 200


# --- parse_ballot -------------------------------------------------------------------------------

LABELS = ["A", "B", "C"]


@pytest.mark.parametrize(
    "vote",
    [
        "B",
        "(B)",
        "[b]",
        "**B**",
        "b.",
        "Proposal B",
        "option B",
        "B - because it is cheaper",
        "B (solar power)",
    ],
)
def test_ballot_forms_all_mean_b(vote: str) -> None:
    ballot = parse_ballot("a1", f"VOTE: {vote}\nCONFIDENCE: 0.9\nREASON: Cheapest.", LABELS)
    assert ballot == Ballot(voter="a1", choice="B", confidence=0.9, reason="Cheapest.")


@pytest.mark.parametrize(
    "label_line", ["vote: C", "**VOTE:** C", "My vote: C", "- Ballot - C", "Final vote = C"]
)
def test_ballot_label_tolerates_case_markdown_and_synonyms(label_line: str) -> None:
    assert parse_ballot("a1", f"{label_line}\nCONFIDENCE: 70%", LABELS).choice == "C"


def test_ballot_without_confidence_gets_half() -> None:
    ballot = parse_ballot("a1", "VOTE: A", LABELS)
    assert (ballot.choice, ballot.confidence, ballot.reason) == ("A", 0.5, "")


def test_the_last_vote_wins() -> None:
    assert parse_ballot("a1", "VOTE: A\nOn reflection:\nVOTE: C", LABELS).choice == "C"


def test_a_reply_that_is_only_a_label_is_a_vote() -> None:
    assert parse_ballot("a1", "  **B**  ", LABELS).choice == "B"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("VOTE: D", "[unknown label D]"),
        ("VOTE: AB", "[unknown label AB]"),
        ("VOTE: A and B", "[several labels]"),
        ("VOTE: A/B", "[several labels]"),
        ("VOTE: A, C", "[several labels]"),
        ("VOTE: A or B", "[several labels]"),
        ("VOTE: none of them", "[no label]"),
        ("VOTE: abstain", "[no label]"),
        ("I prefer B overall.", "[no vote line]"),
        ("", "[no vote line]"),
    ],
)
def test_unusable_ballots_are_abstentions_that_say_why(text: str, why: str) -> None:
    ballot = parse_ballot("a1", text + "\nREASON: hard to say", LABELS)
    assert ballot.choice is None
    assert ballot.reason == f"{why} hard to say"


def test_the_same_label_twice_is_one_vote() -> None:
    assert parse_ballot("a1", "VOTE: B / (b)", LABELS).choice == "B"


def test_ballot_returns_the_label_as_spelled_on_the_ballot() -> None:
    assert parse_ballot("a1", "VOTE: b", ["a", "b"]).choice == "b"


def test_instructions_name_the_labels_the_parsers_read() -> None:
    assert "FINAL POSITION:" in REPLY_INSTRUCTIONS
    assert "CONFIDENCE:" in REPLY_INSTRUCTIONS
    for label in ("VOTE:", "CONFIDENCE:", "REASON:"):
        assert label in BALLOT_INSTRUCTIONS
    assert parse_reply("a1", "Because.\n" + REPLY_INSTRUCTIONS.split("\n", 1)[1]) is not None


# --- build_options, interim_agreement, is_unanimous ---------------------------------------------


def test_options_group_equal_answers_and_label_them_in_key_order() -> None:
    proposals = [
        Proposal("a3", "", "No", 0.6),
        Proposal("a1", "", "Yes", 0.9),
        Proposal("a2", "", "yeah", 0.7),
    ]
    built = build_options(proposals)
    assert built == [
        Option(label="A", position="No", key="no", supporters=("a3",)),
        Option(label="B", position="Yes", key="yes", supporters=("a1", "a2")),
    ]
    assert build_options(list(reversed(proposals))) == built


def test_option_position_is_the_most_common_spelling() -> None:
    proposals = [
        Proposal("a1", "", "yes", 0.1),
        Proposal("a2", "", "yes", 0.1),
        Proposal("a3", "", "YES!", 1.0),
    ]
    assert build_options(proposals)[0].position == "yes"


def test_more_than_26_options_get_two_letter_labels() -> None:
    proposals = [Proposal(f"a{i}", "", f"answer {i}", 0.5) for i in range(28)]
    labels = [o.label for o in build_options(proposals)]
    assert labels[:2] == ["A", "B"]
    assert labels[-2:] == ["AA", "AB"]
    assert len(set(labels)) == 28


def test_interim_agreement_counts_failed_agents_in_the_electorate() -> None:
    proposals = [
        Proposal("a1", "", "42", 0.8),
        Proposal("a2", "", "42.0", 0.8),
        Proposal("a3", "", "41", 0.8),
    ]
    agreement = interim_agreement(proposals, electorate=4)
    assert agreement.leader == "42"
    assert agreement.leader_position == "42"
    assert agreement.share == 0.5
    assert agreement.groups == {"41": 1, "42": 2}
    assert agreement.confidence == pytest.approx(confidence_score(0.5, 0.25, 0.8))


def test_interim_tie_goes_to_confidence_then_key() -> None:
    by_confidence = [Proposal("a1", "", "Yes", 0.9), Proposal("a2", "", "No", 0.6)]
    assert interim_agreement(by_confidence, 2).leader == "yes"
    level = [Proposal("a1", "", "Yes", 0.5), Proposal("a2", "", "No", None)]
    assert interim_agreement(level, 2).leader == "no"


def test_interim_agreement_without_proposals_has_no_leader() -> None:
    agreement = interim_agreement([], electorate=3)
    assert (agreement.leader, agreement.share, agreement.confidence, agreement.groups) == (None, 0.0, 0.0, {})


def test_unanimity_needs_every_agent_of_the_electorate() -> None:
    same = [Proposal("a1", "", "Yes", 0.9), Proposal("a2", "", "yes.", None)]
    assert is_unanimous(same, electorate=2)
    assert not is_unanimous(same, electorate=3)
    assert not is_unanimous([*same, Proposal("a3", "", "No", 0.9)], electorate=3)
    assert not is_unanimous([], electorate=0)


# --- votes --------------------------------------------------------------------------------------


def test_strict_majority_wins_and_reaches_consensus() -> None:
    ballots = [Ballot("a1", "B", 0.6), Ballot("a2", "B", 0.6), Ballot("a3", "A", 1.0)]
    decision = majority_vote(ballots, options("no", "yes"), electorate=3)
    assert (decision.winner, decision.winner_key, decision.winner_position) == ("B", "yes", "Yes")
    assert decision.reached
    assert decision.tie_break is None
    assert decision.tallies == {"A": 1.0, "B": 2.0}
    assert decision.dissent == (Ballot("a3", "A", 1.0),)
    assert decision.confidence == pytest.approx(((2 / 3 + 1 / 3) / 2) * (1 + 0.6) / 2)


def test_tie_is_broken_by_summed_confidence() -> None:
    ballots = [Ballot("a1", "A", 0.9), Ballot("a2", "B", 0.4)]
    decision = majority_vote(ballots, options("no", "yes"), electorate=2)
    assert (decision.winner, decision.tie_break, decision.reached) == ("A", "confidence", False)


def test_tie_with_equal_confidence_goes_to_the_previous_leader() -> None:
    ballots = [Ballot("a1", "A", 0.7), Ballot("a2", "B", 0.7)]
    decision = majority_vote(ballots, options("no", "yes"), electorate=2, previous_leader="yes")
    assert (decision.winner, decision.tie_break) == ("B", "previous_leader")


def test_tie_without_previous_leader_goes_to_the_smaller_key() -> None:
    ballots = [Ballot("a1", "A", 0.7), Ballot("a2", "B", 0.7)]
    stable = [Option("A", "Zebra", "zebra", ()), Option("B", "Ant", "ant", ())]
    for previous in (None, "elephant"):
        decision = majority_vote(ballots, stable, electorate=2, previous_leader=previous)
        assert (decision.winner, decision.tie_break) == ("B", "stable_order")


def test_tie_break_never_looks_at_length() -> None:
    long_text = "A very long and detailed answer " * 20
    tied = [Option("A", long_text, "zzz " + long_text, ()), Option("B", "ok", "ok", ())]
    ballots = [Ballot("a1", "A", 0.5, reason="x" * 900), Ballot("a2", "B", 0.5, reason="")]
    assert majority_vote(ballots, tied, electorate=2).winner == "B"


def test_previous_leader_cannot_beat_a_real_lead() -> None:
    ballots = [Ballot("a1", "A", 0.5), Ballot("a2", "A", 0.5), Ballot("a3", "B", 1.0)]
    decision = majority_vote(ballots, options("no", "yes"), electorate=3, previous_leader="yes")
    assert (decision.winner, decision.tie_break) == ("A", None)


def test_failed_agents_and_abstentions_count_against_the_quorum() -> None:
    ballots = [Ballot("a1", "A", 0.9), Ballot("a2", "A", 0.9), Ballot("a3", None, 0.5, "[no label]")]
    decision = majority_vote(ballots, options("yes"), electorate=5)
    assert decision.winner == "A"
    assert not decision.reached
    assert decision.abstentions == 3
    assert decision.electorate == 5
    assert decision.dissent == (Ballot("a3", None, 0.5, "[no label]"),)


def test_quorum_is_strictly_more_than_the_share() -> None:
    ballots = [Ballot("a1", "A", 1.0), Ballot("a2", "A", 1.0), Ballot("a3", "B", 1.0), Ballot("a4", "B", 0.1)]
    assert not majority_vote(ballots, options("x", "y"), electorate=4).reached
    assert majority_vote(ballots, options("x", "y"), electorate=4, quorum=0.49).reached
    three = ballots[:3]
    assert majority_vote(three, options("x", "y"), electorate=3, quorum=0.66).reached
    assert not majority_vote(three, options("x", "y"), electorate=3, quorum=2 / 3).reached


def test_ballot_for_a_label_not_on_the_ballot_is_an_abstention() -> None:
    decision = majority_vote([Ballot("a1", "Z", 1.0), Ballot("a2", "A", 0.5)], options("yes"), electorate=2)
    assert decision.winner == "A"
    assert decision.abstentions == 1
    assert [b.voter for b in decision.dissent] == ["a1"]


def test_no_valid_ballot_means_no_winner() -> None:
    for strategy in STRATEGIES.values():
        decision = strategy([Ballot("a1", None, 0.5)], options("yes"), electorate=3)
        assert (decision.winner, decision.winner_key, decision.winner_position) == (None, None, "")
        assert (decision.reached, decision.confidence, decision.tie_break) == (False, 0.0, None)
        assert decision.abstentions == 3


def test_no_options_and_no_ballots_is_no_consensus() -> None:
    decision = majority_vote([], [], electorate=0)
    assert (decision.winner, decision.reached, decision.confidence, decision.tallies) == (
        None,
        False,
        0.0,
        {},
    )


def test_confidence_reflects_the_vote() -> None:
    unanimous_sure = [Ballot(f"a{i}", "A", 1.0) for i in range(3)]
    assert majority_vote(unanimous_sure, options("yes"), electorate=3).confidence == 1.0
    unanimous = [Ballot(f"a{i}", "A", 0.8) for i in range(3)]
    assert majority_vote(unanimous, options("yes"), electorate=3).confidence == pytest.approx(0.9)
    with_failure = majority_vote(unanimous, options("yes"), electorate=4).confidence
    assert with_failure < 0.9
    split = [Ballot("a1", "A", 0.8), Ballot("a2", "A", 0.8), Ballot("a3", "B", 0.8)]
    assert majority_vote(split, options("x", "y"), electorate=3).confidence == pytest.approx(0.45)


def test_weighted_vote_lets_confident_voters_outweigh_a_hesitant_majority() -> None:
    ballots = [Ballot("a1", "A", 0.2), Ballot("a2", "A", 0.2), Ballot("a3", "B", 0.9)]
    assert majority_vote(ballots, options("x", "y"), electorate=3).winner == "A"
    weighted = weighted_vote(ballots, options("x", "y"), electorate=3)
    assert weighted.method == "weighted"
    assert weighted.winner == "B"
    assert weighted.tallies == pytest.approx({"A": 0.4, "B": 0.9})
    assert weighted.share == pytest.approx(0.9 / 1.3)
    assert weighted.reached


def test_weighted_vote_still_counts_zero_confidence_ballots() -> None:
    ballots = [Ballot("a1", "A", 0.0), Ballot("a2", "A", 0.0), Ballot("a3", "B", 0.0)]
    decision = weighted_vote(ballots, options("x", "y"), electorate=3)
    assert decision.winner == "A"
    assert decision.confidence < 1.0


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="quorum"):
        majority_vote([], options("x"), electorate=1, quorum=1.0)
    for quorum in (-0.5, -1.0, float("nan")):
        with pytest.raises(ValueError, match="quorum"):
            majority_vote([], options("x"), electorate=1, quorum=quorum)
    assert majority_vote([], options("x"), electorate=1, quorum=0.0).quorum == 0.0
    assert majority_vote([], options("x"), electorate=0).electorate == 0
    with pytest.raises(ValueError, match="electorate"):
        majority_vote([], options("x"), electorate=-1)
    with pytest.raises(ValueError, match="one ballot"):
        majority_vote([Ballot("a1", "A", 1.0), Ballot("a1", "A", 1.0)], options("x"), electorate=2)


def test_decision_is_json_ready_and_records_everything() -> None:
    ballots = [Ballot("a2", "A", 0.7, "fits"), Ballot("a1", "B", 0.7, "cheaper")]
    decision = weighted_vote(ballots, options("no", "yes"), electorate=3, previous_leader="yes")
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["method"] == "weighted"
    assert data["winner"] == "B"
    assert data["winner_key"] == "yes"
    assert data["tie_break"] == "previous_leader"
    assert [b["voter"] for b in data["ballots"]] == ["a1", "a2"]
    assert data["dissent"] == [{"voter": "a2", "choice": "A", "confidence": 0.7, "reason": "fits"}]
    assert data["electorate"] == 3
    assert data["abstentions"] == 1
    assert data["quorum"] == 0.5
    assert [o["label"] for o in data["options"]] == ["A", "B"]


def test_strategies_are_registered_by_name() -> None:
    assert STRATEGIES["majority"] is majority_vote
    assert STRATEGIES["weighted"] is weighted_vote
    assert STRATEGIES["reliability"] is reliability_vote
    assert set(STRATEGIES) == {"majority", "weighted", "reliability"}


# --- behaviour pinned by mutation testing (bench/mutation.py) --------------------------------------


def test_the_margin_is_taken_from_the_best_runner_up_among_several_options() -> None:
    ballots = [Ballot(f"v{i}", label, 1.0) for i, label in enumerate("AAABBC")]
    decision = majority_vote(ballots, options("1", "2", "3"), electorate=6)
    assert decision.winner == "A"
    # share 1/2, runner-up B at 1/3 (not C at 1/6): ((1/2 + 1/6) / 2) x 1.
    assert decision.confidence == pytest.approx(confidence_score(0.5, 2 / 6, 1.0))
    assert decision.confidence == pytest.approx(1 / 3)


def test_interim_margin_is_taken_from_the_best_runner_up() -> None:
    proposals = [
        Proposal(f"a{i}", "", answer, 1.0) for i, answer in enumerate(["1", "1", "1", "2", "2", "3"])
    ]
    agreement = interim_agreement(proposals, electorate=6)
    assert agreement.confidence == pytest.approx(confidence_score(0.5, 2 / 6, 1.0))


def test_a_one_agent_panel_is_unanimous_with_itself() -> None:
    assert is_unanimous([Proposal("a1", "", "42", 0.9)], electorate=1)
    assert not is_unanimous([], electorate=1)
    assert not is_unanimous([Proposal("a1", "", "...", 0.9)], electorate=1)


def test_a_proposal_without_a_confidence_weighs_one_half() -> None:
    agreement = interim_agreement([Proposal("a1", "", "Yes", None), Proposal("a2", "", "Yes", None)], 2)
    assert agreement.confidence == pytest.approx(confidence_score(1.0, 0.0, 0.5))
    assert agreement.confidence == pytest.approx(0.75)
    # The group's spelling tie is settled by the summed weights: 0.5 (None) beats 0.4.
    group = [Proposal("a1", "", "YES", None), Proposal("a2", "", "yes", 0.4)]
    assert build_options(group)[0].position == "YES"


@pytest.mark.parametrize(("confidence", "weight"), [(-0.5, 0.0), (float("nan"), 0.0), (1.5, 1.0), (0.3, 0.3)])
def test_confidences_are_clamped_to_the_unit_interval(confidence: float, weight: float) -> None:
    agreement = interim_agreement([Proposal("a1", "", "Yes", confidence)], 1)
    assert agreement.confidence == pytest.approx(confidence_score(1.0, 0.0, weight))
    decision = weighted_vote([Ballot("v1", "A", confidence)], options("yes"), electorate=1)
    assert decision.tallies["A"] == pytest.approx(max(0.05, weight))
    assert 0.0 <= decision.confidence <= 1.0


def test_confidence_score_clamps_each_input() -> None:
    assert confidence_score(1.5, 0.0, 1.0) == 1.0
    assert confidence_score(-0.5, 0.0, 1.0) == 0.0
    assert confidence_score(1.0, 2.0, 1.0) == pytest.approx(0.5)  # runner-up capped at the share
    assert confidence_score(1.0, -1.0, 1.0) == 1.0
    assert confidence_score(1.0, 0.0, -1.0) == pytest.approx(0.5)
    assert confidence_score(1.0, 0.0, float("nan")) == pytest.approx(0.5)


@pytest.mark.parametrize(("words", "number"), [("five thousand", "5000"), ("one hundred and five", "105")])
def test_number_words_with_scales(words: str, number: str) -> None:
    assert normalize_answer(words) == number


def test_an_empty_label_never_takes_another_label_as_its_value() -> None:
    # The next line is another label: the position stays empty (an abstention), the
    # confidence is still read, and the unlabelled "Yes" after it is not borrowed.
    assert parse_reply("a1", "FINAL POSITION:\nCONFIDENCE: 0.8\nYes") is None
    ballot = parse_ballot("a1", "VOTE:\nCONFIDENCE: 0.7\nB", ["A", "B"])
    assert (ballot.choice, ballot.confidence, ballot.reason) == (None, 0.7, "[no label]")
    ballot = parse_ballot("a1", "VOTE:\n\nB\nCONFIDENCE: 0.7", ["A", "B"])
    assert (ballot.choice, ballot.confidence) == ("B", 0.7)


def test_a_vote_without_valid_ballots_has_no_winner_and_no_share() -> None:
    for strategy in STRATEGIES.values():
        decision = strategy(
            [Ballot("v1", None, 0.9), Ballot("v2", "Z", 0.9)], options("x", "y"), electorate=3
        )
        assert decision.winner is None
        assert decision.share == 0.0
        assert decision.confidence == 0.0
        assert decision.reached is False
        assert decision.abstentions == 3


def test_every_strategy_has_the_signature_of_the_protocol() -> None:
    shared = list(inspect.signature(Strategy.__call__).parameters.values())[1:]  # without self
    assert [p.name for p in shared] == [
        "ballots",
        "options",
        "electorate",
        "previous_leader",
        "quorum",
        "weights",
    ]
    for strategy in STRATEGIES.values():
        assert list(inspect.signature(strategy).parameters.values()) == shared


def test_a_share_at_most_epsilon_above_the_quorum_does_not_reach_it() -> None:
    # Shares are float sums, so a share within EPSILON of the quorum counts as equal to it.
    lone = [Ballot("a1", "A", 1.0)]
    level = majority_vote(lone, options("yes"), electorate=10**9, quorum=0.0)
    assert level.share == EPSILON
    assert not level.reached
    above = majority_vote(lone, options("yes"), electorate=10**9 - 1, quorum=0.0)
    assert above.share > EPSILON
    assert above.reached


def test_top_keeps_the_scores_within_epsilon_of_the_best() -> None:
    scores = {"best": 1.0, "level": 1.0 - EPSILON, "behind": 1.0 - 2 * EPSILON}
    assert top(list(scores), scores.__getitem__) == ["best", "level"]
    assert top([], scores.__getitem__) == []


def test_an_empty_electorate_is_never_unanimous() -> None:
    # No panel, nothing to stop early; the answer is a bool either way.
    assert is_unanimous([Proposal("a1", "", "Yes", 0.9)], electorate=0) is False
    assert is_unanimous([], electorate=0) is False
    assert is_unanimous([Proposal("a1", "", "Yes", 0.9)], electorate=1) is True


def test_the_last_of_several_inline_confidences_wins() -> None:
    text = "I think so, confidence: 0.6.\nOn reflection, confidence: 0.9\nFINAL POSITION: 42"
    proposal = parse_reply("a1", text)
    assert proposal is not None
    assert proposal.confidence == pytest.approx(0.9)
