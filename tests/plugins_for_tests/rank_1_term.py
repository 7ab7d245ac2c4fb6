"""A test plugin: a loss term (zero) that only rank 1 returns."""
from plait.core.hookspecs import hookimpl


@hookimpl
def plait_loss_terms(state, batch, outputs):
    return {"rank_1_only": outputs["logits"].sum() * 0.0} if state.rank == 1 else {}
