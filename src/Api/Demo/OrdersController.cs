using System.Security.Claims;
using Microsoft.AspNetCore.Authorization;
using Microsoft.AspNetCore.Mvc;
using OrleansIdempotency.AspNetCore;

namespace OrleansIdempotency.Api.Demo;

/// <summary>The demo's orders: an MVC controller whose POST is made idempotent by <see cref="IdempotentAttribute"/>.</summary>
[ApiController]
[Route("orders")]
[Authorize]
public sealed class OrdersController(IDemoStore store, TimeProvider time) : ControllerBase
{
    private string UserId => User.FindFirstValue(ClaimTypes.NameIdentifier)!;

    /// <summary>
    /// Creates an order and charges it (the side effects that must happen once). It runs to its end even when the
    /// client has gone (see <see cref="DemoHeaders"/>), so the client's retry gets its outcome.
    /// </summary>
    [HttpPost]
    [Idempotent]
    public async Task<IResult> CreateAsync(CreateOrderRequest request)
    {
        if (await DemoHeaders.ApplyAsync(HttpContext) is { } early)
        {
            return early;
        }

        var order = new Order(Guid.CreateVersion7().ToString(), request.CustomerId, request.Amount, request.Items, DemoClock.Now(time));
        await store.AddOrderAsync(UserId, Request.Headers[IdempotencyKeyHeader.Name], order, CancellationToken.None);
        return TypedResults.Created($"/orders/{order.Id}", order);
    }

    /// <summary>The caller's orders.</summary>
    [HttpGet]
    public async Task<IReadOnlyList<Order>> ListAsync(CancellationToken cancellationToken) =>
        await store.GetOrdersAsync(UserId, cancellationToken);

    /// <summary>One of the caller's orders.</summary>
    [HttpGet("{id}")]
    public async Task<IResult> GetAsync(string id, CancellationToken cancellationToken) =>
        await store.GetOrderAsync(UserId, id, cancellationToken) is { } order
            ? TypedResults.Ok(order)
            // A problem, as the rest of the API answers: [ApiController] makes none of an IResult's bare 404.
            : TypedResults.Problem(statusCode: StatusCodes.Status404NotFound, title: "Not Found", detail: "The caller has no order with this id.");
}
