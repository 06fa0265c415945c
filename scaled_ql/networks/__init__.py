"""Q-networks of Scaled QL: ResNet/IMPALA encoder + trunk + feature norm + per-game heads.

`make_q_network(net_cfg, games, num_atoms)` is the network; `encoder_param_filter` selects the
encoder's params (for transfer); `param_counts`/`flops_per_example` size it.
"""
from scaled_ql.networks.q_network import (QNetworkOutput, encoder_param_filter, make_q_network,
                                          q_network_forward)
from scaled_ql.networks.analysis import flops_breakdown, flops_per_example, param_counts

__all__ = ['QNetworkOutput', 'make_q_network', 'q_network_forward', 'encoder_param_filter',
           'flops_per_example', 'flops_breakdown', 'param_counts']
