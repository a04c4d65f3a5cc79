"""Per-client DP accounting of federated DP-SGD (Opacus): the DP settings, σ calibration and each client's ε.

σ is calibrated once per client so that the planned number of steps spends (ε, δ) under the chosen accountant,
at Poisson rate q = 1/⌈|D_k|/batch_size⌉ (Opacus' rule). Each client's accountant persists across rounds, so the
ε it reports is cumulative (the reference code builds a fresh engine every round and logs per-round ε, spec §2.13
item 2). Opacus is imported lazily: it is the optional `specpeft[federated]` extra.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Literal, Optional

__all__ = ["ClientPrivacy", "DPConfig", "calibrate_noise", "sample_rate_for"]

logger = logging.getLogger("specpeft.federated")


@dataclass(frozen=True)
class DPConfig:
    """Example-level DP-SGD on every client (Opacus).

    Attributes:
        target_epsilon: ε each client may spend over the whole run.
        target_delta: δ (choose < 1/|D_k|; the reference uses 1e-5).
        max_grad_norm: per-sample clipping norm C (flat over all trainable factors; reference 2.0).
        accountant: "prv" (Opacus' default, the reference's) or "rdp".
        calibrate_for: "all_rounds" calibrates σ for steps·rounds (a client sampled every round stays within ε);
            "expected" for steps·rounds·participation (the reference code), and a client whose next round would
            exceed ε is then left out of that round.
        noise_multiplier: a fixed σ instead of calibration (ε is still accounted and reported).
        epsilon_tolerance: precision of the σ search (Opacus' `get_noise_multiplier`).
        seeded_noise: draw the Poisson sampling and the Gaussian noise from the round's seed (a run replays bit for
            bit) instead of from a generator seeded by `os.urandom` (a server that knows the run seed cannot replay
            the noise and cancel it out of ΔB). None (default): seeded in `simulate` (one process, nobody to hide
            from), secret in `flower.make_client_app`. Neither is a CSPRNG; Opacus' `secure_mode` needs torchcsprng.
    """

    target_epsilon: float = 6.0
    target_delta: float = 1e-5
    max_grad_norm: float = 2.0
    accountant: Literal["prv", "rdp"] = "prv"
    calibrate_for: Literal["all_rounds", "expected"] = "all_rounds"
    noise_multiplier: Optional[float] = None
    epsilon_tolerance: float = 0.01
    seeded_noise: Optional[bool] = None

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0 or not 0 < self.target_delta < 1:
            raise ValueError(
                f"DPConfig: target_epsilon={self.target_epsilon} must be > 0 and target_delta={self.target_delta} in "
                "(0, 1), e.g. DPConfig(target_epsilon=6, target_delta=1e-5)."
            )
        if not self.max_grad_norm > 0:
            raise ValueError(f"DPConfig.max_grad_norm={self.max_grad_norm} must be > 0 (reference: 2.0).")
        if self.accountant not in ("prv", "rdp"):
            raise ValueError(f"DPConfig.accountant={self.accountant!r} must be 'prv' or 'rdp'.")
        if self.calibrate_for not in ("all_rounds", "expected"):
            raise ValueError(f"DPConfig.calibrate_for={self.calibrate_for!r} must be 'all_rounds' or 'expected'.")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"DPConfig.noise_multiplier={self.noise_multiplier} must be ≥ 0 or None (calibrate).")


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson rate q = 1/⌈|D|/batch_size⌉, exactly what Opacus' `make_private` derives from the data loader."""
    if num_examples < 1:
        raise ValueError(f"sample_rate_for: a DP client needs ≥ 1 example (got {num_examples}); leave empty clients out.")
    return 1.0 / math.ceil(num_examples / batch_size)


def calibrate_noise(dp: DPConfig, sample_rate: float, steps: int) -> float:
    """σ such that `steps` DP-SGD steps at rate q spend at most (ε, δ) under `dp.accountant` (Opacus' search)."""
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    return _search_noise(dp.target_epsilon, dp.target_delta, sample_rate, steps, dp.accountant, dp.epsilon_tolerance)


@functools.lru_cache(maxsize=256)
def _search_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, tolerance: float
) -> float:
    # Cached: a PRV search costs ~10 accountant evaluations (seconds), and runs comparing methods repeat it.
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=tolerance,
        )
    )


class ClientPrivacy:
    """One client's DP state across rounds: σ, q and an Opacus accountant whose history accumulates.

    Args:
        dp: the DP settings.
        num_examples: |D_k|.
        batch_size: expected batch size.
        planned_steps: steps σ is calibrated for (see `DPConfig.calibrate_for`).
        noise_multiplier: an already calibrated σ for these (q, steps), to skip the search.
    """

    def __init__(
        self,
        dp: DPConfig,
        num_examples: int,
        batch_size: int,
        planned_steps: int,
        noise_multiplier: Optional[float] = None,
    ) -> None:
        from opacus.accountants import create_accountant

        self.dp = dp
        self.sample_rate = sample_rate_for(num_examples, batch_size)
        self.planned_steps = planned_steps
        if noise_multiplier is None:
            noise_multiplier = calibrate_noise(dp, self.sample_rate, planned_steps)
        self.noise_multiplier = float(noise_multiplier)
        self.accountant = create_accountant(mechanism=dp.accountant)
        self._epsilons: dict[tuple[tuple[float, float, int], ...], float] = {}

    @property
    def steps_taken(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def epsilon(self) -> float:
        """Cumulative ε spent so far at δ = target_delta (0 before the first step)."""
        return self._epsilon_of(tuple(self.accountant.history))

    def epsilon_after(self, steps: int) -> float:
        """ε this client would have spent after `steps` more steps (the accountant itself is untouched)."""
        history = list(self.accountant.history)
        if history and history[-1][:2] == (self.noise_multiplier, self.sample_rate):
            history[-1] = (self.noise_multiplier, self.sample_rate, history[-1][2] + steps)  # as Opacus merges steps
        else:
            history.append((self.noise_multiplier, self.sample_rate, steps))
        return self._epsilon_of(tuple(history))

    def refusal(self, steps: int) -> Optional[str]:
        """Why this client may not take `steps` more steps (None: it may). A calibrated σ (no fixed
        `DPConfig.noise_multiplier`) promises ε ≤ target_epsilon, so a round that would spend more is refused, under
        either `calibrate_for`: "expected" plans for fewer steps than a client sampled every round takes, and a run
        longer than the `rounds` σ was calibrated for would overrun "all_rounds" too."""
        if self.dp.noise_multiplier is not None or self.epsilon_after(steps) <= self.dp.target_epsilon * (1 + 1e-6):
            return None
        return f"privacy budget exhausted (ε={self.epsilon():.3f} of {self.dp.target_epsilon})"

    def _epsilon_of(self, history: tuple[tuple[float, float, int], ...]) -> float:
        # Memoized: one PRV evaluation takes ~1 s, and ε is reported every round for every client.
        if not history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in history):
            return math.inf  # no noise: no finite ε
        if history not in self._epsilons:
            self._epsilons[history] = _epsilon(self.dp.accountant, list(history), self.dp.target_delta)
        return self._epsilons[history]


def _epsilon(mechanism: str, history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=mechanism)
    accountant.history = history
    try:
        return float(accountant.get_epsilon(delta))
    except (OverflowError, ValueError) as exc:
        if mechanism == "rdp":
            raise
        # PRV's discretization fails for extreme (σ, q, steps); RDP is a valid (looser) upper bound there.
        logger.warning("PRV accountant failed (%s); reporting the RDP bound instead.", exc)
        return _epsilon("rdp", history, delta)
