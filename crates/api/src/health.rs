//! Liveness and readiness: `/healthz` answers while the process serves requests;
//! `/readyz` only while the database answers and every migration is applied, so a load
//! balancer sends no traffic to an instance that cannot serve it.

use std::time::Duration;

use actix_web::http::Method;
use actix_web::{FromRequest, Handler, HttpRequest, HttpResponse, Resource, Responder, guard, web};
use batchd_domain::wire::ErrorBody;
use serde::Serialize;

use crate::{ApiError, ApiState};

/// How long `/readyz` waits for the database before it answers `503`.
const READINESS_TIMEOUT: Duration = Duration::from_secs(5);

/// The methods the health checks answer.
const GET_OR_HEAD: &[Method] = &[Method::GET, Method::HEAD];

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(get_or_head("/healthz", healthz))
        .service(get_or_head("/readyz", readyz));
}

/// A resource whose one route answers GET and HEAD; any other method is
/// `405 method_not_allowed`.
fn get_or_head<F, Args>(path: &str, handler: F) -> Resource
where
    F: Handler<Args>,
    Args: FromRequest + 'static,
    F::Output: Responder + 'static,
{
    web::resource(path)
        .route(
            web::route()
                .guard(guard::Any(guard::Get()).or(guard::Head()))
                .to(handler),
        )
        .default_service(web::to(|req: HttpRequest| async move {
            Err::<HttpResponse, _>(ApiError::MethodNotAllowed {
                method: req.method().clone(),
                allowed: GET_OR_HEAD,
            })
        }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Health {
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Ready {
    #[schema(value_type = String, example = "ready")]
    status: &'static str,
    #[schema(value_type = String, example = "ok")]
    database: &'static str,
    #[schema(value_type = String, example = "applied")]
    migrations: &'static str,
}

/// `GET /healthz`: 200 `{"status":"ok"}` while the process serves requests.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    summary = "Liveness",
    description = "Answers while the process serves requests. Also answers HEAD.",
    responses((status = 200, description = "The process serves requests", body = Health)),
)]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// `GET /readyz`: 200 when the database is reachable and migrated, else `503 unavailable`
/// naming the part that is not ready.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    summary = "Readiness",
    description = "Ready while the database answers and every migration is applied. Also answers HEAD.",
    responses(
        (status = 200, description = "Ready to serve", body = Ready),
        (status = 503, description = "`unavailable`: the message names the part that is not ready", body = ErrorBody),
    ),
)]
async fn readyz(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let readiness = tokio::time::timeout(READINESS_TIMEOUT, state.store.readiness())
        .await
        .map_err(|_| {
            ApiError::unavailable(format!(
                "not ready: the database did not answer within {} s",
                READINESS_TIMEOUT.as_secs()
            ))
        })?;
    if !readiness.reachable {
        return Err(ApiError::unavailable("not ready: the database is not reachable"));
    }
    if !readiness.migrated {
        return Err(ApiError::unavailable(
            "not ready: database migrations are not applied (run `batchd migrate`)",
        ));
    }
    Ok(HttpResponse::Ok().json(Ready {
        status: "ready",
        database: "ok",
        migrations: "applied",
    }))
}
