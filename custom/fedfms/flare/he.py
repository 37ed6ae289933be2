"""Homomorphic encryption (CKKS with TenSEAL) for FedMSA's travel set, with FLARE's own HE components.

What changes under HE (docs/privacy-he.md):

- a site checks its update in plaintext (keys, shapes, dtypes, finite values, a magnitude bound) and only then
  encrypts it (FLARE's ``HEModelEncryptor``; training results pre-multiplied by the sample count n_k) and sends
  the ciphertexts as bytes (:class:`HECiphertextBytes`: without FLARE's copy of the TenSEAL context per tensor);
- the server never holds a secret key: its contribution check can no longer see shapes or NaN, so it checks
  what is left in the clear or countable (:func:`ciphertext_problems`: CKKS marker, every travel key encrypted,
  each ciphertext readable under the server's own context and holding as many values as the tensor; sample
  count, metrics and frozen-weights fingerprint, which travel in plaintext meta, as before);
- FLARE's ``HEInTimeAccumulateWeightedAggregator`` sums the ciphertexts and scales by 1 / sum(n_k), so the new
  global model is sum(n_k w_k) / sum(n_k) in ciphertext, which the sites decrypt (``HEModelDecryptor``) and
  reshape (:class:`HEReshapeFilter`: TenSEAL decrypts to flat lists);
- the TenSEAL contexts live in each participant's ``startup/`` folder (``server_context.tenseal``: relin keys,
  no secret key; ``client_context.tenseal``: with the secret key), made by FLARE's ``HEBuilder`` at provisioning,
  or by :func:`write_contexts` (same parameters) for the simulator.

The job builder's part (which components an HE job uses, the simulator's contexts) is ``fedfms.flare.he_job``;
this module holds the contexts, the ciphertext checks (the server's contribution check uses them) and the site
filters; the server's HE components are in ``fedfms.flare.he_server``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedfms.flare.replies import error_reply
from fedfms.flare.filters import model_result
from fedfms.flare.update_check import expected_travel_spec, find_problems, key_problems

SERVER_CONTEXT = "server_context.tenseal"  # FLARE's ProvFileName.SERVER_CONTEXT_TENSEAL
CLIENT_CONTEXT = "client_context.tenseal"  # FLARE's ProvFileName.CLIENT_CONTEXT_TENSEAL
CKKS = "CKKS"  # FLARE's HE_ALGORITHM_CKKS (the DXO meta PROCESSED_ALGORITHM of an encrypted result)
# FLARE's HEBuilder defaults: N = 8192 (4096 values per ciphertext), a 60-bit first prime, one 40-bit level for
# the aggregator's multiplication by 1/sum(n_k), the 40-bit special prime; scale 2^40
HE_PARAMS = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40}
# |w| a site may encrypt: n_k w_k x 2^40 must stay inside the 100-bit data modulus, and the average x 2^40 inside
# the 60 bits left after the rescale (|avg| < 2^19); trained weights are orders of magnitude below this
DEFAULT_MAX_ABS = 1e4


# ---------------------------------------------------------------------------------------------- contexts
def make_contexts(poly_modulus_degree: int = 8192, coeff_mod_bit_sizes: list[int] | None = None,
                  scale_bits: int = 40) -> tuple[bytes, bytes]:
    """(server context, client context) exactly as FLARE's ``HEBuilder`` makes them: one symmetric CKKS context;
    the server's copy holds only the relinearisation keys, the sites' copy the secret key as well."""
    import tenseal as ts

    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=int(poly_modulus_degree),
                         coeff_mod_bit_sizes=list(coeff_mod_bit_sizes or HE_PARAMS["coeff_mod_bit_sizes"]),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.generate_relin_keys()
    context.global_scale = 2 ** int(scale_bits)

    def serialized(is_client: bool) -> bytes:
        return context.serialize(save_public_key=is_client, save_secret_key=is_client, save_galois_keys=False,
                                 save_relin_keys=True)

    return serialized(False), serialized(True)


def write_contexts(startup_dir: str | Path, overwrite: bool = False, **params) -> tuple[Path, Path]:
    """Write ``server_context.tenseal`` and ``client_context.tenseal`` into ``startup_dir`` (the simulator's
    ``<workspace>/startup``, which it copies to the server and every site). Existing files are kept unless
    ``overwrite`` (the key pair of a run must not change under the sites' feet). ``params``: as ``HEBuilder``."""
    startup = Path(startup_dir)
    server, client = startup / SERVER_CONTEXT, startup / CLIENT_CONTEXT
    if server.is_file() and client.is_file() and not overwrite:
        return server, client
    startup.mkdir(parents=True, exist_ok=True)
    server_bytes, client_bytes = make_contexts(**{**HE_PARAMS, **params})
    server.write_bytes(server_bytes)
    client.write_bytes(client_bytes)
    client.chmod(0o600)  # the secret key
    return server, client


# ---------------------------------------------------------------------------------------------- checks
def is_ciphertext(value) -> bool:
    try:
        import tenseal as ts
    except ImportError:
        return False
    return isinstance(value, ts.CKKSVector)


def server_context(fl_ctx: FLContext | None = None):
    """The server's TenSEAL context (``server_context.tenseal`` from its startup folder, through FLARE's
    security content service, as FLARE's HE components load it); None where there is none."""
    try:
        from nvflare.app_opt.he.homomorphic_encrypt import load_tenseal_context_from_workspace

        return load_tenseal_context_from_workspace(SERVER_CONTEXT, fl_ctx if fl_ctx is not None else FLContext())
    except Exception:
        return None


def _bind(value, context):
    """A site's ciphertext as a CKKS vector under ``context`` (the server's own keys and parameters, never
    a context the site sent along); bytes when no context is at hand."""
    import tenseal as ts

    raw = value.serialize() if isinstance(value, ts.CKKSVector) else value
    if context is None:
        return value
    return ts.ckks_vector_from(context, raw)


def ciphertext_problems(dxo: DXO, spec: dict, context=None, max_items: int = 3) -> list[str]:
    """What the server can still check of an encrypted travel-set update (empty list: nothing wrong): FLARE's
    CKKS marker, exactly the travel keys, every one marked encrypted, readable as a CKKS ciphertext under the
    server's ``context`` and holding as many values as the tensor has. Shapes, dtypes, NaN/inf and magnitudes
    are invisible in ciphertext: the site's :class:`HEPlaintextCheck` checks them before encrypting.

    With a ``context``, ``dxo.data`` ends up holding CKKS vectors bound to it (sites send bytes, see
    :class:`HECiphertextBytes`; a CKKS vector that arrived with a context of its own is re-read under the
    server's), which is what FLARE's HE aggregator adds up."""
    try:
        if dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) != CKKS:
            return [f"not CKKS-encrypted (meta {MetaKey.PROCESSED_ALGORITHM} is "
                    f"{dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM)!r}); this job expects every update encrypted"]
        data = dxo.data
        if not isinstance(data, dict):
            return [f"weights are a {type(data).__name__}, expected a dict of CKKS vectors"]
        problems = key_problems(data, spec, max_items)
        marked = dxo.get_meta_prop(MetaKey.PROCESSED_KEYS) or {}
        for key in sorted(set(data) & set(spec)):
            shape, _ = spec[key]
            expected = math.prod(shape)
            value = data[key]
            if not marked.get(key):
                problems.append(f"'{key}' is not marked encrypted")
            elif not (is_ciphertext(value) or isinstance(value, bytes)):
                problems.append(f"'{key}' is a {type(value).__name__}, expected a CKKS vector of {expected} values")
            else:
                try:
                    value = data[key] = _bind(value, context)
                except Exception as exc:
                    problems.append(f"'{key}' is not a CKKS ciphertext of this federation's parameters "
                                    f"({type(exc).__name__}: {exc})")
                    value = None
                if isinstance(value, bytes):
                    problems.append(f"'{key}' arrived as bytes, but the server has no TenSEAL context to read it")
                elif value is not None and value.size() != expected:
                    problems.append(f"'{key}' is a CKKS vector of {value.size()} values, expected {expected} "
                                    f"(shape {tuple(shape)})")
            if len(problems) >= max_items + 2:
                break
        return problems
    except Exception as exc:  # never let a malformed update raise inside the server
        return [f"encrypted weights could not be checked ({type(exc).__name__}: {exc})"]


def encrypted_aggregate_problems(aggregate, sizes: dict[str, int | None]) -> list[str]:
    """Why an encrypted aggregate must not replace the global model: other keys, or a ciphertext length that
    is not the tensor's size (``None``: size unknown, only the key is checked)."""
    try:
        if not aggregate:
            return ["no accepted contribution"]
        problems = key_problems(aggregate, sizes)
        for key in sorted(set(aggregate) & set(sizes)):
            value = aggregate[key]
            size = value.size() if is_ciphertext(value) else np.size(value) if isinstance(value, np.ndarray) else None
            if size is None:
                problems.append(f"'{key}' is a {type(value).__name__}, expected a CKKS vector")
            elif sizes[key] is not None and size != sizes[key]:
                problems.append(f"'{key}' holds {size} values, expected {sizes[key]}")
            if len(problems) >= 5:
                break
        return problems
    except Exception as exc:
        return [f"aggregate could not be checked ({type(exc).__name__}: {exc})"]


# ---------------------------------------------------------------------------------------------- site filters
class HEPlaintextCheck(Filter):
    """Site side, last filter before encryption: what the server's check can no longer see in ciphertext:
    exactly the travel set, each tensor's shape and dtype, finite values, and ``|w| <= max_abs`` (a larger value
    would overflow CKKS's modulus and decrypt to garbage after aggregation, silently). A failing result
    becomes an error reply that says why; nothing of it leaves the site."""

    def __init__(self, model_config: dict, max_abs: float = DEFAULT_MAX_ABS):
        super().__init__()
        self.model_config = dict(model_config)
        self.max_abs = float(max_abs)
        self._spec = None

    def problems(self, data) -> list[str]:
        if self._spec is None:
            self._spec = expected_travel_spec(self.model_config)
        problems = find_problems(data, self._spec)
        if problems:
            return problems
        worst = max(((float(np.max(np.abs(v))), k) for k, v in data.items() if np.size(v)), default=(0.0, None))
        if worst[0] > self.max_abs:
            problems.append(f"'{worst[1]}' holds a value of magnitude {worst[0]:.3g}, above {self.max_abs:g} "
                            "(CKKS would overflow)")
        return problems

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = model_result(shareable)
        if dxo is None:
            return shareable
        problems = self.problems(dxo.data)
        if problems:
            reason = "; ".join(problems)
            self.log_error(fl_ctx, f"refusing to encrypt and send the result: {reason}")
            return error_reply(ReturnCode.TASK_RESULT_FILTER_ERROR,
                               f"the site's pre-encryption check refused to send it: {reason}", shareable)
        return shareable


class HECiphertextBytes(DXOFilter):
    """Site side, right after FLARE's ``HEModelEncryptor``: each CKKS vector as its serialized ciphertext.
    Sent as objects, FLARE's FOBS decomposer puts the whole TenSEAL context (relinearisation keys, ~0.66 MB)
    beside every tensor's ciphertext; as bytes only the ciphertext travels (fedmsa_tiny: 124 MB -> 32 MB per
    round), and the server reads it under its own context (:func:`ciphertext_problems`), never the site's."""

    def __init__(self):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF], data_kinds_to_filter=None)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) != CKKS:
            return None
        dxo.data = {k: v.serialize() if is_ciphertext(v) else v for k, v in dxo.data.items()}
        return dxo


class HEReshapeFilter(DXOFilter):
    """Site side, after ``HEModelDecryptor``: TenSEAL decrypts each tensor to a flat list; give it back the
    travel set's shape and float32 (a plaintext model, e.g. the first round's, passes unchanged)."""

    def __init__(self, model_config: dict):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF], data_kinds_to_filter=None)
        self.model_config = dict(model_config)
        self._spec = None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if self._spec is None:
            self._spec = expected_travel_spec(self.model_config)
        out = {}
        for key, value in dxo.data.items():
            array = np.asarray(value)
            shape = self._spec.get(key, (array.shape, None))[0]
            if array.size != math.prod(shape):
                raise ValueError(f"'{key}' holds {array.size} values after decryption, expected {math.prod(shape)}")
            out[key] = array.reshape(shape).astype(np.float32, copy=False)
        dxo.data = out
        return dxo
