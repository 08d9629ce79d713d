"""Consensus: a plain Python library (no Django, no I/O) that turns agents' replies into a decision.

Flow. After each discussion turn every reply is parsed (``parse_reply``) into a
``Proposal`` (final position + confidence) or an abstention (None);
``interim_agreement`` reports the leading answer and ``is_unanimous`` allows an early
stop. For the final vote ``build_options`` groups the proposals by normalised answer
into anonymised options A, B, C... (labelled in key order, so the agents' order does not
matter); each agent's ballot is parsed (``parse_ballot``) and a strategy of
``STRATEGIES`` ("majority" or "weighted") returns a ``Decision``.

Normalisation (``normalize_answer``, details in consensus/normalize.py): case, markdown,
quotes and punctuation are ignored; yes/yeah/yep/yup/true/correct -> "yes",
no/nope/nah/false/incorrect -> "no" (also "Yes, but..."); "B", "(b)", "B)", "Option B",
"Proposal B" -> "option b"; "1,000" -> "1000", "42.0" -> "42", "forty-two" -> "42";
"50%" stays "50%" (not "50"); leading articles are dropped.

Parsing (details in consensus/formats.py): labels are case-insensitive and may carry
markdown; synonyms FINAL ANSWER / POSITION / ANSWER; the last occurrence wins;
confidence as 0.8, 80%, 8/10 or high/medium/low, clamped to [0, 1]; a reply without a
confidence has ``confidence=None`` and weighs 0.5; a ballot without one gets 0.5; a
ballot naming an unknown label, several labels or none is an abstention.

Vote. Only ballots naming an option count; abstentions, unusable ballots and agents
that failed (no ballot at all) stay in the electorate. Majority: one ballot, one vote.
Weighted: a ballot weighs its confidence (at least 0.05). With equal confidences the two
agree. A ballot-holder may vote for its own proposal.

Tie-break (never message length), applied only among options level on the tally:
1. the larger summed ballot confidence ("confidence");
2. the previous turn's leader, a normalised key ("previous_leader");
3. the smaller option key, then label ("stable_order").
``Decision.tie_break`` names the step that settled it (None when there was no tie).

Quorum. share = (winner's tally / all valid tallies) x (valid ballots / electorate),
which is votes / electorate for the majority vote. ``reached`` is True when share is
strictly greater than ``quorum`` (default 0.5) of the electorate; otherwise there is no
consensus (the winner is still reported as the plurality answer).

Confidence = ((share + margin) / 2) x ((1 + certainty) / 2), where margin = share minus
the runner-up's share and certainty = mean ballot confidence of the winner's
supporters. It lies in [0, 1], is 1.0 only for a unanimous electorate with full
confidence, and falls with failed or abstaining agents (share), dissent (margin) and
hesitant supporters (certainty). Example: 3 agents, votes 2-1, supporters at 0.8 ->
((2/3 + 1/3) / 2) x 0.9 = 0.45; 3-0 at 0.8 -> 0.9. The interim agreement uses the same
formula over the turn's proposals. This figure is the *agreement* (how much the panel
agrees), not a probability of being right.

Calibrated confidence (consensus/calibration.py): P(the answer is right | the agents'
first-turn answers) under a one-coin Dawid-Skene model with per-model reliabilities,
estimated without labels (EM) from past panels and recalibrated with labelled feedback
(Platt). The "reliability" strategy weighs each ballot by its voter's evidence weight
log(r / ((1 - r) s)), so the winner is the answer that model finds most probable.
"""

from consensus.agreement import answer_keys, build_options, interim_agreement, is_unanimous
from consensus.calibration import (
    PlattScaling,
    Posterior,
    Reliabilities,
    fit_reliabilities,
    posterior,
    vote_weights,
)
from consensus.formats import (
    BALLOT_INSTRUCTIONS,
    REPLY_INSTRUCTIONS,
    parse_ballot,
    parse_confidence,
    parse_reply,
)
from consensus.normalize import normalize_answer
from consensus.records import Agreement, Ballot, Decision, Option, Proposal
from consensus.scoring import confidence_score
from consensus.structured import (
    ANSWER_SCHEMA,
    BALLOT_JSON_INSTRUCTIONS,
    REPAIR_INSTRUCTIONS,
    REPAIR_JSON_INSTRUCTIONS,
    REPAIR_SCHEMA,
    REPAIR_TEXT_INSTRUCTIONS,
    REPLY_JSON_INSTRUCTIONS,
    ballot_schema,
    clean_answer,
    last_sentence_position,
    parse_json_object,
    parse_structured_ballot,
    parse_structured_reply,
)
from consensus.voting import STRATEGIES, Strategy, majority_vote, reliability_vote, weighted_vote

__all__ = [
    "ANSWER_SCHEMA",
    "BALLOT_INSTRUCTIONS",
    "BALLOT_JSON_INSTRUCTIONS",
    "REPAIR_INSTRUCTIONS",
    "REPAIR_JSON_INSTRUCTIONS",
    "REPAIR_SCHEMA",
    "REPAIR_TEXT_INSTRUCTIONS",
    "REPLY_INSTRUCTIONS",
    "REPLY_JSON_INSTRUCTIONS",
    "STRATEGIES",
    "Agreement",
    "Ballot",
    "Decision",
    "Option",
    "PlattScaling",
    "Posterior",
    "Proposal",
    "Reliabilities",
    "Strategy",
    "answer_keys",
    "ballot_schema",
    "build_options",
    "clean_answer",
    "confidence_score",
    "fit_reliabilities",
    "interim_agreement",
    "is_unanimous",
    "last_sentence_position",
    "majority_vote",
    "normalize_answer",
    "parse_ballot",
    "parse_confidence",
    "parse_json_object",
    "parse_reply",
    "parse_structured_ballot",
    "parse_structured_reply",
    "posterior",
    "reliability_vote",
    "vote_weights",
    "weighted_vote",
]
