"""Limits that are facts of the platform, not per-model knobs, in one place.

Standard library only: it ships in every model archive (handlers import it) and the harness
reads it too (the `mmekit` client, the editor, the emulator, TorchServe's rendered profiles)
without importing torch. Per-model knobs live in configs/<model>/model-config.yaml instead.
"""

# SageMaker's InvokeEndpoint payload limit, for the request and for the response (6 MB). The
# local profiles set TorchServe's max_request_size and max_response_size to it, the client
# refuses a larger body before sending, and the emulator answers as SageMaker does.
SAGEMAKER_PAYLOAD_BYTES = 6_291_456

# Room TorchServe's framing takes around a handler's response: a handler's own JSON must stay
# this far under the payload limit, or the worker fails to send it.
RESPONSE_FRAMING_BYTES = 1024

# SD's seeds: torch.Generator seeds as the AWS sample's clients send them (an unsigned 32-bit
# number); the response carries the seed used, so a result can be made again.
MAX_SEED = 2**32 - 1
