"""The engine process itself: its startup, its fast exit, the fork server of local engines, stop requests
(drains, spot notices) and the spot-notice watcher."""
