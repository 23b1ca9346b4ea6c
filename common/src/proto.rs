//! Generated gRPC types and services (`proto/worker.proto`, package `ferrite.worker.v1`;
//! `proto/cluster.proto`, package `ferrite.cluster.v1`).

#![allow(clippy::all, missing_docs)]

/// Router ↔ worker protocol.
pub mod worker {
    tonic::include_proto!("ferrite.worker.v1");
}

/// Router ↔ router raft transport, and the cluster service workers register with (`proto/cluster.proto`).
pub mod cluster {
    tonic::include_proto!("ferrite.cluster.v1");
}

/// A refused call's gRPC status with its structured [`worker::Rejection`] attached.
pub fn rejection_status(kind: worker::rejection::Kind, field: &str, message: impl Into<String>) -> tonic::Status {
    use prost::Message;
    let code = match kind {
        worker::rejection::Kind::Overloaded => tonic::Code::ResourceExhausted,
        _ => tonic::Code::InvalidArgument,
    };
    let details = worker::Rejection { kind: kind as i32, field: field.to_string() }.encode_to_vec();
    tonic::Status::with_details(code, message, details.into())
}

/// The [`worker::Rejection`] a status carries, if any.
pub fn rejection_of(status: &tonic::Status) -> Option<worker::Rejection> {
    use prost::Message;
    if status.details().is_empty() {
        return None;
    }
    worker::Rejection::decode(status.details()).ok()
}

#[cfg(test)]
mod tests {
    use super::worker::rejection::Kind;
    use super::*;

    #[test]
    fn a_rejection_round_trips_through_the_status_details() {
        let s = rejection_status(Kind::InvalidArgument, "top_p", "`top_p` must be in (0, 1], got 0");
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let r = rejection_of(&s).expect("details decode");
        assert_eq!((r.kind(), r.field.as_str()), (Kind::InvalidArgument, "top_p"));
        assert_eq!(rejection_status(Kind::Overloaded, "", "full").code(), tonic::Code::ResourceExhausted);
        assert!(rejection_of(&tonic::Status::invalid_argument("`x` plain")).is_none());
    }
}
