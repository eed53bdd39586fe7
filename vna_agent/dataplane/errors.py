"""The data plane's error tree, rooted in :class:`bus.errors.SkyferryError`.

::

    DataplaneError
    ├── KeyFileError                  unreadable/malformed key file, loose permissions
    ├── HandshakeError                a handshake message was refused
    │   ├── UnknownPeer               initiator's static key is not on the allow-list
    │   ├── ReplayedInitiation        initiation timestamp not newer than the last one
    │   └── HandshakeAuthError        bad mac1/tag, wrong responder key, malformed message
    ├── RecordError                   a data record was refused (``reason`` names the drop counter)
    │   ├── BadTag                    AEAD tag did not verify (altered or wrong key)
    │   ├── ReplayedRecord            counter already seen or older than the window
    │   ├── NoSession                 no usable session for this index / not yet keyed
    │   ├── LinkDown                  no peer connection to send on
    │   ├── NonceExhausted            send counter reached its limit; rekey needed
    │   ├── RecordTooBig              payload larger than a record may carry
    │   └── DecodeError               malformed record or framing
    ├── TransportError                socket-level failure (retryable)
    ├── DeviceError                   TAP open/ioctl/attach failure
    └── SwitchError                   bridge/FDB/VXLAN netlink failure

Record errors are raised on the hot path only for refused records; the
tunnel turns them into drop counters by their ``reason``.
"""

from __future__ import annotations

from bus.errors import ErrorCode, SkyferryError


class DataplaneError(SkyferryError):
    """Root of every data-plane error."""


class KeyFileError(DataplaneError):
    """A key file is missing, malformed or readable by others."""

    code = ErrorCode.VALIDATION


class HandshakeError(DataplaneError):
    """A handshake message was refused."""

    code = ErrorCode.UNAUTHENTICATED


class UnknownPeer(HandshakeError):
    """The initiator's static public key is not configured."""


class ReplayedInitiation(HandshakeError):
    """The initiation's timestamp is not newer than the last accepted one."""


class HandshakeAuthError(HandshakeError):
    """mac1 or an AEAD tag did not verify, or the message is malformed."""


class RecordError(DataplaneError):
    """A data record was refused; ``reason`` is the drop counter's name."""

    code = ErrorCode.BAD_REQUEST
    reason = "decode"


class BadTag(RecordError):
    reason = "bad_tag"


class ReplayedRecord(RecordError):
    reason = "replay"


class NoSession(RecordError):
    reason = "no_session"


class LinkDown(RecordError):
    reason = "link_down"


class NonceExhausted(RecordError):
    reason = "nonce_exhausted"


class RecordTooBig(RecordError):
    reason = "too_big"


class DecodeError(RecordError):
    reason = "decode"


class TransportError(DataplaneError):
    """Socket-level failure; the tunnel reconnects."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class DeviceError(DataplaneError):
    """The TAP device could not be opened, configured or attached."""

    code = ErrorCode.INTERNAL


class SwitchError(DataplaneError):
    """A bridge, FDB or VXLAN netlink operation failed."""

    code = ErrorCode.INTERNAL
