Attention = SelfAttention = KVCache = patch = None
