"""Where MLflow models registered before the tracking/ folder existed import their model class.

Their logged code says ``from tasks.serving import FFSplitVariantModel``; new ones import it from
tracking.serving. Keeps every registered version loadable.
"""

from tracking.serving import FFSplitVariantModel

__all__ = ["FFSplitVariantModel"]
