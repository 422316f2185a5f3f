//! Conveyor: ordered, non-blocking delivery to a slow external service.
