"""AdamW over a model's LoRA parameters; the update itself runs in the engine."""
from __future__ import annotations

import math
from typing import Any, Optional


class AdamW:
    """torch.optim.AdamW semantics (amsgrad off) with optional gradient clipping.

    ``step()`` clips the global gradient norm to ``max_grad_norm`` (None: no clipping),
    updates the parameters and returns the norm before clipping. A non-finite norm
    skips the update (the parameters and moments stay as they were).
    """

    def __init__(self, model: Any, lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: Optional[float] = None) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.model = model
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = max_grad_norm
        self.step_count = 0
        self.last_grad_norm: float = 0.0
        self.skipped_steps = 0

    def step(self, grad_scale: float = 1.0) -> float:
        """One update from the accumulated gradients (divided by grad_scale first)."""
        norm = self.model.engine.adamw_step(
            lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
            weight_decay=self.weight_decay,
            max_grad_norm=float(self.max_grad_norm) if self.max_grad_norm else 0.0,
            grad_scale=float(grad_scale), step=self.step_count + 1)
        self.last_grad_norm = float(norm)
        if math.isfinite(norm):
            self.step_count += 1
        else:
            self.skipped_steps += 1
        return self.last_grad_norm

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
                "skipped_steps": self.skipped_steps, "moments": self.model.optimizer_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.model.load_optimizer_state(state["moments"])
