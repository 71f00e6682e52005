"""The public wire contract (msgpack): SignRequest, SignResult, DLQ records, frames, and the refusal catalogue."""

from .dlq import DlqRecord
from .errors import SchemaError
from .eth_tx import EthTx, parse_eth_tx
from .refusals import Code, Refused
from .sign_request import SCHEMES, SignRequest, decode_sign_request
from .sign_result import STATUSES, SignResult, decode_sign_result

__all__ = [
    "SCHEMES",
    "STATUSES",
    "Code",
    "DlqRecord",
    "EthTx",
    "Refused",
    "SchemaError",
    "SignRequest",
    "SignResult",
    "decode_sign_request",
    "decode_sign_result",
    "parse_eth_tx",
]
