"""LEMoE: a mixture-of-experts adaptor for lifelong knowledge editing (Wang & Li, EMNLP 2024),
with KV-anchor routing, a calibrated null route, order planning, rollback and persistence."""

from lemoe.methods.lemoe.config import LEMoEConfig
from lemoe.methods.lemoe.method import LEMoE
from lemoe.methods.lemoe.planning import StreamingPlanner, kmeans, plan_clustered

__all__ = ["LEMoE", "LEMoEConfig", "StreamingPlanner", "kmeans", "plan_clustered"]
