"""A test plugin: adds a layer the model never uses, declared as such (``declare: true``) or not."""
from torch import nn

from plait.core.config import Options
from plait.core.hookspecs import hookimpl


class SpareWeightOptions(Options):
    declare: bool = False


@hookimpl
def plait_config_schema():
    return SpareWeightOptions


@hookimpl
def plait_configure_model(model, config):
    model.spare = nn.Linear(2, 2)
    model.spare.may_leave_parameters_unused = config.options(SpareWeightOptions).declare
    return model
