using OrleansIdempotency.Api;
using OrleansIdempotency.Api.Demo;
using OrleansIdempotency.Api.Gateway;
using OrleansIdempotency.AspNetCore;
using OrleansIdempotency.Once;
using OrleansIdempotency.Silo.Hosting;

var builder = WebApplication.CreateBuilder(args);
builder.AddIdempotencyCluster();
builder.Services.AddIdempotency(options =>
{
    options.DefaultPolicy = options.DefaultPolicy.Configure(builder.Configuration.GetSection("Idempotency")).KeepingUnknownWritesInDoubt();
    options.AddPolicy(DemoEndpoints.PaymentsPolicy, policy => policy with { ConcurrentDuplicates = ConcurrentDuplicateHandling.Reject });
});
builder.AddDemo();
var gateway = builder.AddGateway();
builder.Services.AddOpenApi(options => options.AddIdempotency());
builder.Services.AddRequestTimeouts();
// A minimal API's body it cannot bind (malformed JSON) is a 400 its endpoint answers, stored and replayed as the 4xx
// it is, in every environment alike: in Development alone it would otherwise be an exception, releasing the key.
builder.Services.Configure<RouteHandlerOptions>(options => options.ThrowOnBadRequest = false);

var app = builder.Build();
// Outside the idempotency middleware: it sees an action's exception first (and releases the key). Kestrel's own
// verdicts on a malformed request (a broken chunked body, one that arrives too slowly, a client that hangs up mid-body)
// keep their 4xx status, and are not logged as errors of this server: they are the client's. (On idempotent endpoints
// the layer reads the body first and answers these itself.)
app.UseExceptionHandler(new ExceptionHandlerOptions
{
    StatusCodeSelector = exception => exception is BadHttpRequestException bad ? bad.StatusCode : StatusCodes.Status500InternalServerError,
    SuppressDiagnosticsCallback = context => context.Exception is BadHttpRequestException,
});
app.UseAuthentication();
app.UseAuthorization();
// Endpoints' time-outs (a gateway route's Timeout, [RequestTimeout]) end the requests that run past them, apart from
// idempotent ones: outside the layer, their time-out does not reach an action that may take effect (its answer is
// stored for the retry).
app.UseRequestTimeouts();
app.UseIdempotency();
// An error status without a body (a route's 404, a media type's 415, a minimal API's 400) becomes a problem
// (RFC 9457). Inside the layer: the problem an idempotent action's client got is what is stored and replayed, not a
// body made again for each replay. A gateway route's backend answers pass untouched (GatewayExtensions).
app.UseStatusCodePages();
app.MapControllers();
app.MapDemoEndpoints();
app.MapClusterHealth();
app.MapOnce().RequireAuthorization();
app.MapIdempotencyKeys().RequireAuthorization(DemoServiceCollectionExtensions.OperatorsPolicy);
if (gateway)
{
    app.MapGateway();
}

app.MapOpenApi();
app.Run();

/// <summary>The demo API; public so tests can host it.</summary>
public partial class Program;
