"""Rounds: items that become ready while a round is in flight share the next round."""

from __future__ import annotations

import asyncio

import pytest

from conversations.rounds import Rounds


async def test_items_submitted_during_a_round_go_together_in_the_next() -> None:
    seen: list[list[int]] = []
    gate = asyncio.Event()

    async def do_round(items: list[int]) -> list[int | BaseException]:
        seen.append(items)
        if len(seen) == 1:
            await gate.wait()  # the first round is in flight while the others arrive
        return [item * 10 for item in items]

    rounds: Rounds[int, int] = Rounds(do_round)
    first = asyncio.ensure_future(rounds.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(rounds.submit(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(first, *later) == [10, 20, 30, 40]
    assert seen == [[1], [2, 3, 4]]


async def test_each_caller_gets_its_own_outcome_and_a_cancelled_one_leaves_the_round_alone() -> None:
    done: list[int] = []

    async def do_round(items: list[int]) -> list[int | BaseException]:
        await asyncio.sleep(0.01)
        done.extend(items)
        return [ValueError(f"bad {item}") if item == 2 else item for item in items]

    rounds: Rounds[int, int] = Rounds(do_round)
    calls = [asyncio.ensure_future(rounds.submit(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    calls[2].cancel()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert outcomes[0] == 1
    assert isinstance(outcomes[1], ValueError)
    assert isinstance(outcomes[2], asyncio.CancelledError)
    assert done == [1, 2, 3]  # the cancelled caller's item was still done, with the others


async def test_a_fault_of_the_round_reaches_every_caller_as_itself() -> None:
    async def do_round(items: list[int]) -> list[int | BaseException]:
        raise RuntimeError("the round broke")

    rounds: Rounds[int, int] = Rounds(do_round)
    outcomes = await asyncio.gather(rounds.submit(1), rounds.submit(2), return_exceptions=True)
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]
    with pytest.raises(RuntimeError):
        await rounds.submit(3)  # and the next round runs
