"""SageMaker in its own room: `make promote`'s steps, one module each (the command line is
scripts/promote.py), and the local multi-model endpoint they are tested against.

settings   configs/promote.yaml, MMEKIT_<KEY> and flags; the files; PromoteError
gate       the manifest's tarballs, re-hashed, and the record of those the tests passed
ami        the InferenceAmiVersion whose NVIDIA driver runs the image's CUDA build
naming     content-hash names of the endpoint's model and endpoint config
errors     AWS's error replies: the code, and "not found"
endpoint   the image by digest (built and pushed, or IMAGE_URI) and the endpoint on it
s3         content-addressed uploads, never overwritten, verified by SHA-256
scaling    Application Auto Scaling, and its release while an instance type changes
smoke      every model through sagemaker-runtime, each on a CUDA device
promoter   the Promoter: the steps' methods, one seam for AWS clients, the operation log
promotion  the --dry-run plan and promotion.json
teardown   the endpoint's models (`make models`) and `make teardown`
iam        the least-privilege IAM policies, rendered from iam/*.json (`make iam-policy`)
debug      --debug: botocore's log of every call, credentials redacted
emulator   `make serve-mme`: the SageMaker runtime API on loopback, before a real TorchServe
"""
