using System.Security.Claims;
using OrleansIdempotency.AspNetCore;

namespace OrleansIdempotency.Api.Demo;

/// <summary>The demo's minimal-API endpoints: payments, and the pair of benchmark endpoints.</summary>
public static class DemoEndpoints
{
    /// <summary>The named policy of <c>POST /payments</c>: concurrent duplicates get 409 at once instead of waiting.</summary>
    public const string PaymentsPolicy = "payments";

    public static IEndpointRouteBuilder MapDemoEndpoints(this IEndpointRouteBuilder app)
    {
        var payments = app.MapGroup("/payments").RequireAuthorization();
        payments.MapPost("", CreatePaymentAsync).RequireIdempotency(PaymentsPolicy);
        payments.MapGet("", (ClaimsPrincipal user, IDemoStore store, CancellationToken cancellationToken) =>
            store.GetPaymentsAsync(UserId(user), cancellationToken));
        // Where a created payment's Location points.
        payments.MapGet("/{id}", async Task<IResult> (string id, ClaimsPrincipal user, IDemoStore store, CancellationToken cancellationToken) =>
            (await store.GetPaymentsAsync(UserId(user), cancellationToken)).FirstOrDefault(p => p.Id == id) is { } payment
                ? TypedResults.Ok(payment)
                : TypedResults.Problem(statusCode: StatusCodes.Status404NotFound, title: "Not Found", detail: "The caller has no payment with this id."));

        // The same tiny handler with and without the layer, so its cost can be measured as a ratio in one run.
        var bench = app.MapGroup("/bench").RequireAuthorization();
        bench.MapPost("/plain", EchoAsync);
        bench.MapPost("/idempotent", EchoAsync).RequireIdempotency();
        return app;
    }

    private static async Task<IResult> CreatePaymentAsync(CreatePaymentRequest request, HttpContext context, IDemoStore store, TimeProvider time)
    {
        var currency = request.Currency ?? "EUR";
        var amountValid = request.Amount is > 0 and <= 1_000_000 && CentsAttribute.IsCents(request.Amount);
        if (!amountValid || currency.Length != 3 || !currency.All(char.IsAsciiLetterUpper))
        {
            return TypedResults.ValidationProblem(new Dictionary<string, string[]>
            {
                ["amount"] = amountValid ? [] : ["Must be more than 0 and at most 1,000,000, in whole cents (at most two decimal places)."],
                ["currency"] = currency.Length == 3 && currency.All(char.IsAsciiLetterUpper) ? [] : ["Must be a three-letter ISO 4217 code such as EUR."],
            }.Where(e => e.Value.Length > 0).ToDictionary());
        }

        if (await DemoHeaders.ApplyAsync(context) is { } early)
        {
            return early;
        }

        var payment = new Payment(Guid.CreateVersion7().ToString(), request.Amount, currency, DemoClock.Now(time));
        await store.AddPaymentAsync(UserId(context.User), context.Request.Headers[IdempotencyKeyHeader.Name], payment, CancellationToken.None);
        return TypedResults.Created($"/payments/{payment.Id}", payment);
    }

    /// <summary>The benchmark endpoints' handler: echoes the request body as JSON, with no side effect.</summary>
    public static async Task EchoAsync(HttpContext context)
    {
        context.Response.ContentType = "application/json";
        await context.Request.Body.CopyToAsync(context.Response.Body, context.RequestAborted);
    }

    private static string UserId(ClaimsPrincipal user) => user.FindFirstValue(ClaimTypes.NameIdentifier)!;
}
