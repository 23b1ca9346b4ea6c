//! Text handling on the router side: stop strings (and, next, incremental detokenization per choice).

pub mod stop;
