"""The client's side of SecAgg+: Flower's `secaggplus_mod` masks the weights; the training is the usual one."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedsim.config import FedsimConfig
from fedsim.federation import federation_for

Trainer = Callable[[ArrayRecord, ConfigRecord, Context, FedsimConfig], RecordDict]


def is_secure(msg: Message) -> bool:
    """Whether a train message is a SecAgg+ round: the legacy FitIns format with SecAgg+'s stage record."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secaggplus_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod for SecAgg+ rounds; every other message passes untouched."""
    if msg.metadata.message_type == MessageType.TRAIN and is_secure(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_train(msg: Message, context: Context, config: FedsimConfig, train: Trainer) -> Message:
    """Train on a legacy FitIns and reply with a legacy FitRes, which secaggplus_mod masks before it leaves."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    like = federation_for(config).build_model().state_dict()
    arrays = parameters_to_ndarrays(fitins.parameters)
    state = {
        name: torch.from_numpy(np.asarray(a)).to(t.dtype).reshape(t.shape)
        for (name, t), a in zip(like.items(), arrays, strict=True)
    }
    content = train(ArrayRecord(state), ConfigRecord(dict(fitins.config)), context, config)
    trained = content["arrays"].to_torch_state_dict()
    metrics = dict(content["metrics"])
    fitres = FitRes(
        status=Status(code=Code.OK, message="OK"),
        parameters=ndarrays_to_parameters([trained[name].numpy() for name in like]),
        num_examples=int(metrics["num-examples"]),
        metrics={"train-loss": float(metrics["train-loss"])},
    )
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
