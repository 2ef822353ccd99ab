"""What people read: the results page generated from MLflow runs (results) and the charts
(plots, observation_plots). flows -> reports -> tracking, ffsplit.
"""
