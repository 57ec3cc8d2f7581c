"""nn.Modules, one concept per file.

Every sequence mixer and channel mixer follows one protocol:

    y, state = layer(x, state=None)      # x, y: [batch, time, d_model]
    state = layer.init_state(batch_size, device, dtype)

`state` is a flat dict of tensors whose first dimension is the batch (an empty dict for stateless
layers); `state=None` means `init_state(...)`. Feeding a sequence in consecutive pieces with the state
carried gives the same outputs as one call on the whole sequence.
"""
