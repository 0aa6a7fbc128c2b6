"""stream-forecaster: streaming one-step-ahead LSTM forecasts for sensor fleets on Kafka."""

__version__ = "0.1.0"
__all__ = ["__version__"]
