import torch

# Tests are timed on small machines; intra-op threads only add contention there.
torch.set_num_threads(1)
