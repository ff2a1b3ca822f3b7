//! Collective algorithms as pure schedules, plus the one executor that drives links.
